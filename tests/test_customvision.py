"""Import from Azure Custom Vision (``--data customvision://...``) against a stand-in of the
Training API on 127.0.0.1 (tests/customvision_server.py) that serves real digit photos:
paging, a 429, failing and flaky downloads, a broken, an untagged and an off-host image,
multi-tag images, a wrong key, a wrong project, and the key in no output."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pandas as pd
import pytest

from customvision_server import CustomVisionStandIn, StandInImage
from triview import customvision as cv
from triview import manifest as mf
from triview.demo import write_digits
from triview.ingest import IngestError, ingest

KEY = "cv-key-" + uuid.uuid4().hex   # must never show up in any output
CLI = [sys.executable, "-m", "triview"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, list[bytes]]:
    """Real digit photos (JPEG, 64 px) of classes 3 and 8."""
    folder = tmp_path_factory.mktemp("cv-digits")
    write_digits(folder, per_class=12)
    return {d: [p.read_bytes() for p in sorted((folder / d).iterdir())] for d in ("3", "8")}


def _project(photos) -> list[StandInImage]:
    three, eight = photos["3"], photos["8"]
    images = [StandInImage(three[i], ["three"]) for i in range(6)]
    images += [StandInImage(eight[i], ["eight"]) for i in range(6)]
    images += [StandInImage(three[6 + i], ["three", "eight"]) for i in range(3)]   # multi-tag
    images += [
        StandInImage(three[9], ["three"], download="expired"),         # 403: not retried
        StandInImage(eight[9], ["eight"], download="flaky"),           # 503 once, then fine
        StandInImage(b"<html>not a picture</html>", ["three"]),        # broken image
        StandInImage(eight[10], ["eight"], regions_only=True),         # object-detection regions
        StandInImage(eight[11], ["eight"],                             # cloud metadata: SSRF
                     uri="http://169.254.169.254/latest/meta-data/iam/security-credentials/"),
        StandInImage(three[10], ["three"], uri="https://photos.example.com/o-1.jpg?sig=x"),
        StandInImage(three[11], []), StandInImage(eight[8], []),       # untagged
    ]
    return images


def _run(args: list[str], key: str | None = KEY) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != cv.KEY_ENV}
    if key is not None:
        env[cv.KEY_ENV] = key
    return subprocess.run(CLI + args, capture_output=True, text=True, env=env, timeout=300)


def _all_text(folder: Path) -> str:
    return "\n".join(p.read_bytes().decode("latin-1") for p in folder.rglob("*") if p.is_file())


def test_ingest_accounts_for_every_served_image_and_never_shows_the_key(photos, tmp_path):
    images = _project(photos)
    out = tmp_path / "dataset"
    with CustomVisionStandIn(KEY, images, page_cap=4, throttle_skip=4,
                             extra_tags=("unused",)) as standin:
        proc = _run(["ingest", "--data", standin.address, "--out", str(out), "--workers", "1"])
        assert proc.returncode == 0, proc.stderr
        served = len(images)
        manifest = mf.read_manifest(out)
        quarantine = pd.read_csv(out / mf.QUARANTINE_FILE)
        # every served image is in the manifest or the quarantine, each once, by its id
        assert len(manifest) + len(quarantine) == served
        ids = sorted(list(manifest["original_path"]) + list(quarantine["path"]))
        assert ids == sorted(img.id for img in images)
        by_id = {img.id: img for img in images}
        reasons = {by_id[p].id: r for p, r in zip(quarantine["path"], quarantine["reason"])}
        assert sorted(reasons.values()) == sorted(["download_failed", "not_an_image",
                                                   "outside_root", "outside_root",
                                                   "untagged", "untagged"])
        assert all(r in mf.QUARANTINE_REASONS for r in reasons.values())
        # multi-tag images are multi-label rows; the labels are the tag names
        labels = dict(zip(manifest["original_path"], manifest["labels"]))
        for img in images:
            if img.id in labels:
                assert labels[img.id] == ";".join(sorted(img.tags))
        assert sum(";" in v for v in labels.values()) == 3
        assert mf.read_classes(out) == ["eight", "three"]   # a tag without images is no class
        # paging: 21 tagged images at 4 a page, the second page throttled once and retried
        n_tagged = sum(bool(img.tags) for img in images)
        tagged_pages = standin.api_calls("/images/tagged?")
        assert n_tagged == 21 and len(tagged_pages) == 6 + 1
        assert sum("skip=4" in p for p in tagged_pages) == 2
        assert all("orderBy=Oldest" in p for p in tagged_pages)   # new images come last
        # downloads: the flaky one twice, the expired one once (403 is final), off-host never
        downloads = standin.downloads()
        flaky = next(img for img in images if img.download == "flaky")
        expired = next(img for img in images if img.download == "expired")
        assert sum(flaky.id in p for p, _ in downloads) == 2 and flaky.id in labels
        assert sum(expired.id in p for p, _ in downloads) == 1
        assert "HTTP 403" in quarantine.set_index("path").loc[expired.id, "detail"]
        assert not [p for p, _ in standin.requests if "security-credentials" in p]
        # the key went to the API only: no download carried it
        assert all("training-key" not in h for _, h in downloads)
        assert all(h.get("training-key") == KEY for p, h in standin.requests
                   if p.startswith("/customvision/"))
    # the key is in no output: stdout, stderr, manifest, quarantine, dataset.json, stage.json
    record = json.loads((out / "stage.json").read_text())
    assert record["counts"]["input"] == served
    for text in (proc.stdout, proc.stderr, _all_text(out)):
        assert KEY not in text
        assert standin.sig not in text   # nor the SAS signatures of the image URIs
    assert f"{served} files" in proc.stdout


def test_a_download_failing_with_5xx_is_tried_then_quarantined(photos, tmp_path, monkeypatch):
    monkeypatch.setenv(cv.KEY_ENV, KEY)
    monkeypatch.setattr(cv, "BACKOFF_FACTOR_S", 0.01)
    images = _project(photos)[:14] + [StandInImage(photos["3"][9], ["three"], download="fail")]
    with CustomVisionStandIn(KEY, images) as standin:
        result = ingest(standin.address, tmp_path / "out", workers=1, plot=False)
        tries = sum(images[-1].id in p for p, _ in standin.downloads())
    assert tries == cv.TRIES
    row = result.quarantine.set_index("path").loc[images[-1].id]
    assert row["reason"] == "download_failed" and f"HTTP 500 after {cv.TRIES} tries" in row["detail"]
    assert len(result.manifest) == 14


def test_downloads_run_in_ingests_worker_processes(photos, tmp_path, monkeypatch):
    """Large projects are read by the pool: each worker downloads with its own session."""
    import triview.ingest

    monkeypatch.setenv(cv.KEY_ENV, KEY)
    monkeypatch.setattr(triview.ingest, "_POOL_MIN_FILES", 1)
    images = _project(photos)[:15]
    with CustomVisionStandIn(KEY, images) as standin:
        result = ingest(standin.address, tmp_path / "out", workers=2, plot=False)
        agents = {h.get("user-agent") for _, h in standin.downloads()}
    assert len(result.manifest) == 15 and result.n_input == 15
    assert agents and not any("customvision" in (a or "") for a in agents)  # not the API client


def test_a_long_retry_after_is_cut_short(photos, tmp_path, monkeypatch):
    """A Retry-After of an hour must not hang the import: it is cut to MAX_RETRY_AFTER_S."""
    import time

    monkeypatch.setenv(cv.KEY_ENV, KEY)
    monkeypatch.setattr(cv, "MAX_RETRY_AFTER_S", 1)
    with CustomVisionStandIn(KEY, _project(photos)[:6], throttle_skip=0,
                             retry_after="3600") as standin:
        t0 = time.monotonic()
        result = ingest(standin.address, tmp_path / "out", workers=1, plot=False)
        assert time.monotonic() - t0 < 30
        assert sum("skip=0" in p for p in standin.api_calls("/images/tagged?")) == 2
    assert len(result.manifest) == 6


def test_a_listing_short_of_the_count_stops_the_import(photos, tmp_path, monkeypatch):
    """Images deleted while the project is listed would be lost without a word."""
    monkeypatch.setenv(cv.KEY_ENV, KEY)
    with CustomVisionStandIn(KEY, _project(photos)[:6], count_extra=1) as standin:
        with pytest.raises(IngestError, match="counted 7 tagged images .* but listed 6: the "
                                              "project changed while it was read"):
            ingest(standin.address, tmp_path / "out", workers=1, plot=False)


def test_no_log_line_holds_the_key_even_at_debug_level(photos, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(cv.KEY_ENV, KEY)
    caplog.set_level(logging.DEBUG)
    images = _project(photos)[:15]
    with CustomVisionStandIn(KEY, images, page_cap=4, throttle_skip=0) as standin:
        result = ingest(standin.address, tmp_path / "out", workers=1, plot=False)
    assert result.n_input == 15 and len(result.manifest) == 15
    assert "Retry" in caplog.text or "429" in caplog.text  # the logs were captured
    assert KEY not in caplog.text


@pytest.mark.parametrize("what", ["wrong key", "wrong project", "no key"])
def test_a_wrong_key_or_project_is_a_clear_error(photos, tmp_path, what):
    images = _project(photos)[:3]
    with CustomVisionStandIn(KEY, images) as standin:
        address = standin.address
        if what == "wrong project":
            address = address.replace(standin.project_id, str(uuid.uuid4()))
        key = {"wrong key": "not-the-" + KEY, "no key": None}.get(what, KEY)
        proc = _run(["ingest", "--data", address, "--out", str(tmp_path / "o")], key=key)
        downloads = standin.downloads()
    assert proc.returncode == 2 and not downloads
    err = proc.stderr
    expected = {"wrong key": "refused the training key (HTTP 401)",
                "wrong project": f"has no project {address.split('/')[3].split('?')[0]}",
                "no key": f"set ${cv.KEY_ENV}"}[what]
    assert expected in err and "Traceback" not in err
    assert KEY not in err + proc.stdout
    if what == "wrong key":
        assert cv.KEY_ENV in err


def test_a_redirect_from_the_api_is_not_followed(photos, tmp_path, monkeypatch):
    """A redirect would carry the key to whatever host it names."""
    monkeypatch.setenv(cv.KEY_ENV, KEY)
    with CustomVisionStandIn(KEY, _project(photos)[:3], redirect=True) as standin:
        with pytest.raises(IngestError, match="HTTP 302"):
            ingest(standin.address, tmp_path / "o", workers=1, plot=False)
        assert not [p for p, _ in standin.requests if p.startswith("/steal")]


@pytest.mark.parametrize("address, message", [
    ("customvision://user:hunter2@example.cognitiveservices.azure.com/" + str(uuid.uuid4()),
     "holds credentials"),
    ("customvision://example.cognitiveservices.azure.com/" + str(uuid.uuid4()) + "?scheme=http",
     "only for a stand-in"),
    ("customvision://example.cognitiveservices.azure.com/projects", "names no project id"),
    ("customvision://example.cognitiveservices.azure.com/" + str(uuid.uuid4()) + "?iteration=7",
     "iteration must be"),
    ("customvision://example.cognitiveservices.azure.com/" + str(uuid.uuid4()) + "?key=abc",
     "unknown or repeated"),
])
def test_bad_addresses_are_refused_without_repeating_them(address, message):
    with pytest.raises(cv.CustomVisionError, match=message) as info:
        cv.ProjectUri.parse(address)
    assert "hunter2" not in str(info.value)


def test_the_address_names_an_https_endpoint_by_default():
    pid = str(uuid.uuid4())
    project = cv.ProjectUri.parse(f"customvision://westeurope.api.cognitive.microsoft.com/{pid}")
    assert project.endpoint == "https://westeurope.api.cognitive.microsoft.com"
    assert project.project_id == pid and project.iteration_id is None


@pytest.mark.parametrize("uri, allowed", [
    ("https://irisprodeuwtraining.blob.core.windows.net/i-1/o-2?sv=1&sig=s", True),
    ("https://westeurope.api.cognitive.microsoft.com/x.jpg", True),       # the endpoint host
    ("https://mirror.example.com/o-2.jpg", True),                         # allowed_roots
    ("http://irisprodeuwtraining.blob.core.windows.net/i-1/o-2", False),  # not https
    ("https://blob.core.windows.net.evil.example/o-2", False),
    ("https://evil.example/o-2", False),
    ("file:///etc/passwd", False),
    ("https://user:pw@irisprodeuwtraining.blob.core.windows.net/o-2", False),
    ("i-1/o-2", False),                                                   # VNET artifact path
])
def test_downloads_only_from_the_service_hosts(uri, allowed):
    project = cv.ProjectUri.parse(f"customvision://westeurope.api.cognitive.microsoft.com/"
                                  f"{uuid.uuid4()}")
    hosts = cv.DownloadHosts.for_project(project, ["https://mirror.example.com", "/data"])
    refusal = hosts.refusal(uri)
    assert (refusal is None) == allowed, refusal
    if refusal:
        assert "sig=" not in refusal and "pw" not in refusal


def test_the_docker_runner_refuses_a_custom_vision_source(tmp_path):
    """Its tasks have no network; the subprocess runner passes the address to ingest."""
    from pipelines.local import run_local

    address = f"customvision://127.0.0.1:1/{uuid.uuid4()}?scheme=http"
    with pytest.raises(ValueError, match="use --runner subprocess"):
        run_local(address, str(tmp_path / "out"), runner="docker")
