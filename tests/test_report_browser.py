"""The evaluation report in a real browser: headless Chromium renders the tables and
every embedded image (none broken) and the page is not blank."""
import base64
import html as htmllib
import io
import json
import re
import shutil
import subprocess

import pytest
from PIL import Image


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--disable-dev-shm-usage", "--hide-scrollbars"]
CHECK_SCRIPT = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  document.body.setAttribute('data-check', JSON.stringify({
    images: imgs.length,
    broken: imgs.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt),
    tables: document.querySelectorAll('table').length,
    cells: document.querySelectorAll('td').length,
    headings: [...document.querySelectorAll('h2')].map(h => h.textContent)}));
});
</script></body>"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("Chromium is not installed (Debian package `chromium`; .ci/run installs it)")


@pytest.fixture(scope="module")
def report(evaluated):
    return evaluated / "report.html"


def _run(browser, args, tmp_path, timeout=180):
    profile = tmp_path / "profile"
    profile.mkdir(exist_ok=True)
    return subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_report_is_self_contained_with_every_section(report):
    text = report.read_text()
    assert not re.search(r"""(src|href)=['"](?!data:)""", text), "external resource in the report"
    for heading in ("Gate (champion / challenger)", "Test metrics", "Per class F1", "Timing",
                    "Training curves", "Voter candidates", "Confusion matrices", "ROC curve",
                    "Misclassified", "Grad-CAM per view"):
        assert heading in text, heading
    for view in ("left", "center", "right"):
        assert f"<h3>{view}</h3>" in text
    uris = re.findall(r"src='data:image/png;base64,([^']+)'", text)
    assert len(uris) > 20
    for uri in uris:  # every embedded image decodes
        Image.open(io.BytesIO(base64.b64decode(uri))).load()


def test_chromium_renders_tables_and_images_without_broken_ones(report, tmp_path):
    browser = _chromium()
    checked = tmp_path / "checked.html"
    checked.write_text(report.read_text().replace("</body>", CHECK_SCRIPT, 1))
    proc = _run(browser, ["--virtual-time-budget=10000", "--dump-dom", checked.as_uri()], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = re.search(r'data-check="([^"]*)"', proc.stdout)
    assert found, "the page's load handler did not run: " + proc.stdout[:500]
    check = json.loads(htmllib.unescape(found.group(1)))
    assert check["broken"] == [], check["broken"]
    assert check["images"] > 20 and check["tables"] >= 6 and check["cells"] > 100
    assert "Grad-CAM per view (branch's predicted class)" in check["headings"]


def test_chromium_screenshot_is_not_blank(report, tmp_path):
    browser = _chromium()
    shot = tmp_path / "report.png"
    proc = _run(browser, [f"--screenshot={shot}", "--window-size=1280,2000",
                          "--virtual-time-budget=10000", report.as_uri()], tmp_path)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 2000)
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 50, "screenshot is (nearly) a single colour"
    # text and plots: a good share of the page is not background white
    grey = image.convert("L")
    dark = sum(1 for v in grey.getdata() if v < 200)
    assert dark > 0.01 * image.size[0] * image.size[1]
