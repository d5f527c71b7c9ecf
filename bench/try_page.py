"""The try page against ``triview predict`` on the same photos, in the same run.

"page": a real browser (headless Chromium, Selenium) on ``/try`` of a running
``triview serve``: from handing it N photos (the file input) until every answer is on the
page, decode, crop, the ONNX ensemble with its per-view outputs, the boxes and the labels
included. "predict": ``triview predict --model M <N photos> --format json`` as a user runs
it (a fresh process: start-up and model load included). "direct": ``Predictor.predict`` on
the same files in this process, model loaded (the floor: no process start, no HTTP, no
browser). The paths alternate round by round, so load from other processes hits them alike;
each round also checks that the page's labels equal predict's.

    .venv/bin/python bench/try_page.py --model DIR --images ../shared/data/hymenoptera/val \
        --json bench/results_try_page.json --screenshot docs/images/try-page.png

Writes ``{"ratio_page_over_predict": median page / median predict, "ratio_page_over_direct",
"labels_equal", "rounds": [...], ...}``.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from triview.predict import Predictor, expand_inputs  # noqa: E402
from triview.serving.infra import ServerProcess  # noqa: E402

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,1000")


def browser(profile: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + (f"--user-data-dir={profile}",):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def page_labels(driver) -> dict | None:
    """``{file name: [(label, score)]}`` once every card is answered, else None."""
    return driver.execute_script("""
      const cards = [...document.querySelectorAll('article.result')];
      if (!cards.length || cards.some(c => c.dataset.state === 'pending')) return null;
      return Object.fromEntries(cards.map(c => [c.dataset.name,
        [...c.querySelectorAll('ul.labels li[data-label]')].map(
          li => [li.dataset.label, Number(li.dataset.score)])]));""")


def page_round(driver, photos: list[Path], timeout: float = 300.0) -> tuple[float, dict]:
    from selenium.webdriver.common.by import By

    clear = driver.find_element(By.ID, "clear")
    if clear.is_enabled():
        clear.click()
    field = driver.find_element(By.ID, "files")
    t0 = time.perf_counter()
    field.send_keys("\n".join(str(p) for p in photos))
    while True:
        labels = page_labels(driver)
        if labels is not None and len(labels) == len(photos):
            return time.perf_counter() - t0, labels
        if time.perf_counter() - t0 > timeout:
            raise RuntimeError("the page did not answer in time")
        time.sleep(0.01)


def predict_round(model: str, photos: list[Path]) -> tuple[float, dict]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "triview", "predict", "--model", model,
                           *map(str, photos), "--format", "json"],
                          capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - t0
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    return seconds, {Path(r["path"]).name: [(x["label"], x["score"]) for x in r["labels"]]
                     for r in rows}


def small_png(source: Path, target: Path, width: int = 1000) -> None:
    """The screenshot for the docs: scaled to ``width`` and quantised (a few hundred KB)."""
    from PIL import Image

    img = Image.open(source).convert("RGB")
    img = img.resize((width, round(img.height * width / img.width)), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    img.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(buffer, format="PNG",
                                                                    optimize=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(buffer.getvalue())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="exported model folder")
    parser.add_argument("--images", required=True, help="folder of photos (sorted, first --n)")
    parser.add_argument("--n", type=int, default=20, help="photos per batch (default 20)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per path (default 5)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--screenshot", help="save the page after the last round here (PNG)")
    args = parser.parse_args()

    paths = [Path(p) for p in expand_inputs([args.images])]
    step = max(1, len(paths) // args.n)   # spread over the folder (ants and bees)
    photos = paths[::step][:args.n]
    direct = Predictor(args.model)
    rounds = []
    with ServerProcess(args.model, "bench") as server, tempfile.TemporaryDirectory() as profile:
        driver = browser(profile)
        try:
            driver.get(f"http://127.0.0.1:{server.port}/try")
            while "classes" not in driver.execute_script(
                    "return document.getElementById('model-status').textContent"):
                time.sleep(0.05)
            page_round(driver, photos[:2])   # warm-up: the browser, the server's first crop
            for r in range(args.rounds):
                page_s, page = page_round(driver, photos)
                predict_s, cli = predict_round(args.model, photos)
                t0 = time.perf_counter()
                direct.predict([str(p) for p in photos])
                direct_s = time.perf_counter() - t0
                equal = {k: [(lab, round(s, 6)) for lab, s in v] for k, v in page.items()} == cli
                rounds.append({"page_s": round(page_s, 3), "predict_s": round(predict_s, 3),
                               "direct_s": round(direct_s, 3), "labels_equal": equal})
                print(f"round {r + 1}: page {page_s:.2f} s, triview predict {predict_s:.2f} s, "
                      f"direct {direct_s:.2f} s, labels equal: {equal}", flush=True)
            if args.screenshot:
                raw = Path(profile) / "shot.png"
                driver.save_screenshot(str(raw))
                small_png(raw, Path(args.screenshot))
        finally:
            driver.quit()
    page = statistics.median(r["page_s"] for r in rounds)
    cli = statistics.median(r["predict_s"] for r in rounds)
    floor = statistics.median(r["direct_s"] for r in rounds)
    card = direct.card
    result = {
        "n_photos": len(photos), "photos": [p.name for p in photos],
        "model": {"views": card["views"], "image_size": card["image_size"],
                  "backbones": sorted({(t.get("config") or {}).get("backbone", "?")
                                       for t in (card.get("training") or {}).values()})},
        "page_median_s": page, "predict_median_s": cli, "direct_median_s": floor,
        "ratio_page_over_predict": round(page / cli, 3),
        "ratio_page_over_direct": round(page / floor, 3),
        "labels_equal": all(r["labels_equal"] for r in rounds), "rounds": rounds,
        "machine": {"cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                    "load_1min_at_end": round(os.getloadavg()[0], 2)},
    }
    print(f"page / triview predict: {result['ratio_page_over_predict']:.2f} "
          f"(page {page:.2f} s, predict {cli:.2f} s); page / direct: "
          f"{result['ratio_page_over_direct']:.2f} (direct {floor:.2f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["labels_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
