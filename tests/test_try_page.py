"""The try page (``GET /try``) on the real predictor (``triview serve`` in the serving
environment), served from a registry so that versions can be picked: its API answers what
the v1 route answers, with each view's box and top label; bad photos, an oversized body and
a broken version get clear messages; and in headless Chromium (Selenium) real photos
uploaded by the file input and by drag and drop get the labels of ``triview predict``, at
the default threshold and after the threshold is moved with the keyboard."""
from __future__ import annotations

import http.client
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from triview import crop
from triview.artifacts import ONNX_FILE
from triview import manifest as mf
from triview.registry import ModelRegistry
from triview.serving import protocol
from triview.serving.infra import ServerProcess, post_json, request
from conftest import stored_photos

REPO = Path(__file__).resolve().parents[1]
HYMENOPTERA = REPO.parent / "shared" / "data" / "hymenoptera"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
MAX_BODY = 3_000_000
TRIVIEW = [sys.executable, "-m", "triview"]


@pytest.fixture(scope="module")
def registry(exported, tmp_path_factory) -> Path:
    """Versions 1 (champion, served) and 2 of one export, and a version 3 whose ONNX file
    is broken."""
    root = tmp_path_factory.mktemp("try-registry")
    reg = ModelRegistry(str(root), "digits")
    for _ in range(3):
        reg.publish(exported)
    (Path(reg.uri(3)) / ONNX_FILE).write_bytes(b"not an onnx graph")
    reg.promote(1)
    return root / "models" / "digits"


@pytest.fixture(scope="module")
def server(registry, serve_python):
    with ServerProcess(str(registry), "digits", python=serve_python,
                       extra_args=("--max-body-bytes", str(MAX_BODY),
                                   "--inference-workers", "2")) as srv:
        yield srv


@pytest.fixture(scope="module")
def digit_photos(ingested) -> list[Path]:
    return stored_photos(ingested, mf.read_manifest(ingested)["path"][:8])


def _get(server, path):
    status, body = request(server.port, "GET", path)
    return status, json.loads(body) if body[:1] in (b"{", b"[") else body


def _predict(server, data: bytes, model: str = "served"):
    status, body = request(server.port, "POST", f"/try/api/predict?model={model}", data,
                           {"Content-Type": "application/octet-stream"})
    return status, json.loads(body)


def _triview_predict(model, paths, *options) -> list[dict]:
    proc = subprocess.run(TRIVIEW + ["predict", "--model", str(model), *map(str, paths),
                                     "--format", "json", *options],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


# ----------------------------------------------------------------------------- the API


def test_the_page_and_its_files_come_from_the_package(server):
    status, page = _get(server, "/try")
    assert status == 200
    text = page.decode()
    assert '<script src="/try/static/try.js"' in text and 'href="/try/static/try.css"' in text
    assert "http://" not in text and "https://" not in text   # nothing from elsewhere
    assert '<label for="model">' in text and '<label for="threshold">' in text
    assert '<label for="files">' in text
    assert ">digits (served, version 1)</option>" in text and ">digits version 3<" in text
    for name in ("try.js", "try.css"):
        assert _get(server, f"/try/static/{name}")[0] == 200
    for bad in ("try.html", "..%2Fpage.py", "%2E%2E%2F%2E%2E%2Fserver.py", "missing.js"):
        assert _get(server, f"/try/static/{bad}")[0] == 404, bad
    # screen readers hear the answers and the errors
    assert 'id="progress" class="status" role="status" aria-live="polite"' in text
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", "/try")
    policy = conn.getresponse().getheader("Content-Security-Policy")
    conn.close()
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy and "default-src 'none'" in policy


def test_the_page_escapes_what_it_shows(serve_python):
    code = ("from triview.serving.page import render_page; print(render_page("
            "[{'id': '\\\"><img src=x>', 'label': '<script>alert(1)</script>', 'served': True}], "
            "{'max_body_bytes': 1048576, 'max_pixels': 10, 'parallel': 1, 'x': '</main>'}))")
    out = subprocess.run([serve_python, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    assert "<script>alert" not in out and "&lt;script&gt;alert(1)&lt;/script&gt;" in out
    assert "<img src=x>" not in out and out.count("</main>") == 1


def _luminance(hex_colour: str) -> float:
    rgb = [int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5)]
    lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def _contrast(a: str, b: str) -> float:
    hi, lo = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_the_page_colours_are_readable():
    """WCAG contrast: text at least 7:1 (AAA), the views' lines at least 3:1 (graphics)."""
    css = (REPO / "triview" / "serving" / "static" / "try.css").read_text()
    colour = dict(re.findall(r"--([\w-]+): (#[0-9a-f]{6})", css))
    for text in ("ink", "muted", "error", "accent"):
        assert _contrast(colour[text], colour["paper"]) >= 7, text
    assert _contrast("#ffffff", colour["accent"]) >= 7            # button text
    assert _contrast("#595959", "#e8e8e8") >= 4.5                 # disabled button text
    for view in ("view-0", "view-1", "view-2"):
        assert _contrast(colour[view], colour["paper"]) >= 3, view


def test_the_page_answers_what_the_v1_route_answers_with_each_view(server, digit_photos,
                                                                   registry):
    images = [p.read_bytes() for p in digit_photos]
    status, v1 = post_json(server.port, "/v1/models/digits:predict", protocol.v1_request(images))
    assert status == 200
    card = json.loads((registry / "1" / "model_card.json").read_text())
    geometry = crop.CropGeometry(**card["crop_geometry"])
    views_json = _triview_predict(registry, digit_photos, "--views")
    for data, want, cli in zip(images, protocol.v1_labels(v1), views_json):
        status, got = _predict(server, data)
        assert status == 200, got
        assert got["labels"] == want                         # what the API answers
        assert got["labels"] == cli["labels"]                # and triview predict
        width, height = Image.open(io.BytesIO(data)).size
        assert (got["width"], got["height"]) == (width, height)
        boxes = crop.view_boxes(width, height, geometry)
        assert [v["name"] for v in got["views"]] == card["views"]
        for view in got["views"]:
            assert view["box"] == list(boxes[view["name"]])  # identity lens: the crop boxes
            assert view["top"] == cli["views"][view["name"]]
            assert view["top"]["label"] == card["classes"][int(np.argmax(view["probabilities"]))]
        assert len(got["probabilities"]) == len(card["classes"])


def test_bad_photos_and_models_get_clear_messages_and_the_server_keeps_serving(server,
                                                                              digit_photos):
    photo = digit_photos[0].read_bytes()
    assert _predict(server, b"hello, this is text") == (400, {"error": "not an image"})
    heic = b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + b"\0" * 64
    assert _predict(server, heic) == (400, {"error": "unsupported format (heic)"})
    assert _predict(server, b"")[1]["error"] == "the photo is empty (0 bytes)"
    bomb = io.BytesIO()
    Image.new("1", (20000, 10000)).save(bomb, format="PNG")   # 200 M pixels in a few KB
    status, body = _predict(server, bomb.getvalue())   # refused from its header: 413, as v1/v2
    assert status == 413 and body["error"].startswith("decompression bomb")
    big = io.BytesIO()
    Image.new("1", (9000, 6000)).save(big, format="PNG")   # 54 MP: past serving's 50 MP cap
    status, body = _predict(server, big.getvalue())
    assert status == 413 and "decompression-bomb guard" in body["error"], body
    status, _ = request(server.port, "POST", "/try/api/predict", b"\xff" * (MAX_BODY + 1),
                        {"Content-Type": "application/octet-stream"})
    assert status == 413
    status, body = _predict(server, photo, model="3")
    assert status == 503 and body["error"].startswith("version 3 failed to load: ")
    status, body = _get(server, "/try/api/models/3")
    assert status == 503 and "failed to load" in body["error"]
    assert _predict(server, photo, model="../1")[0] == 503
    assert _predict(server, photo, model="9")[1]["error"] == "version 9 is not in the registry"
    status, got = _predict(server, photo, model="2")   # another version: the same export
    assert status == 200 and got["labels"] == _predict(server, photo)[1]["labels"]
    status, models = _get(server, "/try/api/models")
    assert [m["id"] for m in models["models"]] == ["served", "3", "2"]
    assert models["limits"]["max_body_bytes"] == MAX_BODY
    assert request(server.port, "GET", "/v2/health/ready")[0] == 200 and server.alive()


# ----------------------------------------------------------------------------- the browser


def _browser(download_dir: Path, profile: Path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1400", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(download_dir),
                                              "download.prompt_for_download": False})
    # an explicit driver: Selenium Manager never looks for (or downloads) one
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def _wait(driver, condition, timeout=120, what="the page"):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(
        condition, message=f"timed out waiting for {what}")


def _page_answers(driver) -> dict:
    """Per photo card: its state, labels (name, full-precision score), views, error."""
    return driver.execute_script("""
      const out = {};
      for (const card of document.querySelectorAll('article.result')) {
        out[card.dataset.name] = {
          state: card.dataset.state,
          labels: [...card.querySelectorAll('ul.labels li[data-label]')].map(
            li => [li.dataset.label, Number(li.dataset.score)]),
          views: Object.fromEntries([...card.querySelectorAll('ol.views li')].map(
            li => [li.dataset.view, [li.dataset.label, Number(li.dataset.score)]])),
          boxes: card.querySelectorAll('svg rect').length,
          error: (card.querySelector('.error') || {}).textContent || null};
      }
      return out;""")


def _settled(driver, n):
    answers = _page_answers(driver)
    return answers if len(answers) == n and all(a["state"] != "pending"
                                                 for a in answers.values()) else False


def _counts(driver) -> dict[str, int]:
    from selenium.webdriver.common.by import By

    return {row.get_attribute("data-class"): int(row.get_attribute("data-count"))
            for row in driver.find_elements(By.CSS_SELECTOR, "#counts tbody tr")}


def _same(page, cli):
    """Labels and scores (6 decimals, as predict prints them) of every photo agree."""
    for row in cli:
        got = page[Path(row["path"]).name]
        assert got["state"] == "ok", got
        assert [(k, round(s, 6)) for k, s in got["labels"]] == \
            [(x["label"], x["score"]) for x in row["labels"]], row["path"]


@pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason="../shared/data/hymenoptera is not beside the repo")
def test_in_chromium_uploaded_photos_get_the_labels_of_triview_predict(server, registry,
                                                                     tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    photos = sorted((HYMENOPTERA / "val" / "ants").glob("*.jpg"))[:3] + \
        sorted((HYMENOPTERA / "val" / "bees").glob("*.jpg"))[:3]
    dropped = tmp_path / "notes.jpg"
    dropped.write_text("meeting notes, not a photo")
    big = tmp_path / "huge.jpg"
    big.write_bytes(b"\xff\xd8" + b"\0" * (MAX_BODY + 10))
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = _browser(downloads, tmp_path / "profile")
    try:
        driver.get(f"http://127.0.0.1:{server.port}/try")
        _wait(driver, lambda d: "classes" in d.find_element(By.ID, "model-status").text,
              what="the model description")
        driver.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in photos + [big]))
        # drag and drop: the drop zone's handler gets a file as from the desktop
        driver.execute_script("""
          const file = new File([arguments[0]], 'notes.jpg', {type: 'image/jpeg'});
          const data = new DataTransfer(); data.items.add(file);
          document.getElementById('drop').dispatchEvent(
            new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true}));""",
                              dropped.read_text())
        page = _wait(driver, lambda d: _settled(d, len(photos) + 2), what="the answers")
        cli = _triview_predict(registry, photos, "--views")
        _same(page, cli)
        for row in cli:    # each view's own top label, and its box drawn on the photo
            got = page[Path(row["path"]).name]
            assert {v: (k, round(s, 6)) for v, (k, s) in got["views"].items()} == \
                {v: (x["label"], x["score"]) for v, x in row["views"].items()}
            assert got["boxes"] == 3
        assert page["notes.jpg"]["error"] == "Not predicted: not an image"
        assert "larger than this server accepts (3 MB per photo)" in page["huge.jpg"]["error"]
        top = [row["labels"][0]["label"] for row in cli]
        assert _counts(driver) == {c: top.count(c) for c in _counts(driver)}
        assert sum(_counts(driver).values()) == len(photos)

        # the threshold, moved with the keyboard: Home (0.00), then five steps right
        slider = driver.find_element(By.ID, "threshold")
        slider.send_keys(Keys.HOME)
        slider.send_keys(*[Keys.ARROW_RIGHT] * 5)
        assert driver.find_element(By.ID, "threshold-value").text == "0.05"
        page = _page_answers(driver)
        moved = _triview_predict(registry, photos, "--threshold", "0.05")
        _same(page, moved)
        assert any(len(row["labels"]) > 1 for row in moved)   # the threshold mattered
        # a single-label model counts each photo once, by its best class, at any threshold
        assert _counts(driver) == {c: top.count(c) for c in _counts(driver)}

        driver.find_element(By.ID, "download-json").click()
        target = downloads / "answers.json"
        _wait(driver, lambda d: target.exists() and target.stat().st_size > 0, 30, "the download")
        saved = {row["path"]: row for row in json.loads(target.read_text())}
        for row in moved:
            assert saved[Path(row["path"]).name]["labels"] == row["labels"]
        assert saved["notes.jpg"]["error"] == "not an image"
        driver.find_element(By.ID, "download-csv").click()
        table = downloads / "answers.csv"
        _wait(driver, lambda d: table.exists() and table.stat().st_size > 0, 30, "the CSV")
        assert table.read_text().splitlines()[0].startswith("path,labels,scores,")

        # a version that fails to load says so; the served model answers again after it
        Select(driver.find_element(By.ID, "model")).select_by_value("3")
        _wait(driver, lambda d: "could not be loaded" in d.find_element(By.ID, "model-status").text,
              what="the load failure")
        assert "version 3 failed to load" in driver.find_element(By.ID, "model-status").text
        Select(driver.find_element(By.ID, "model")).select_by_value("served")
        page = _wait(driver, lambda d: _settled(d, len(photos) + 2), what="the answers again")
        _same(page, moved)
        shot = tmp_path / "try-page.png"
        driver.save_screenshot(str(shot))
        assert Image.open(shot).convert("L").getextrema()[0] < 100   # not a blank page
    finally:
        driver.quit()
