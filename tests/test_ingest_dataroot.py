"""Data-root confinement: paths in tables, data.yaml and ZIP members lead only inside
the data root (or an allowed root). Everything else is ``outside_root``, and what lies
outside is never opened, stat-ed or listed: checked from the kernel's side with
strace, a check that is itself shown to catch an outside open and an outside stat."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pandas as pd
import pytest
from file_watch import touching, traced
from s3_server import BUCKET, fault_proxy, moto_server, s3_endpoint  # noqa: F401
from test_ingest_bad_inputs import FIXTURES, expected, outcomes

from triview import manifest as mf
from triview.ingest import ingest


def _corpus_module():
    spec = importlib.util.spec_from_file_location("make_bad_inputs", FIXTURES / "make_bad_inputs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ingest_traced(tmp: Path, runs: list[list[str]], log: Path, home: Path):
    """``triview ingest`` once per argument list, all in one traced Python process."""
    driver = ("import json, sys\nfrom triview.cli import main\n"
              "sys.exit(max(main(['ingest', *a]) for a in json.loads(sys.argv[1])))")
    return traced([sys.executable, "-c", driver, json.dumps(runs)], log, cwd=tmp,
                  env={**os.environ, "HOME": str(home)}, timeout=600)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """The hostile-table corpus, a YOLO folder whose data.yaml names outside folders and
    the committed bad-input corpus, ingested under strace. HOME is a folder holding a
    secret too, so that expanding ``~`` would show."""
    corpus = _corpus_module()
    tmp = tmp_path_factory.mktemp("hostile")
    outside, home = tmp / "outside-canary", tmp / "home-canary"
    table, table_rows = corpus.write_table_corpus(tmp / "root", outside)
    home.mkdir()
    (home / "secret.jpg").write_bytes((outside / "secret.jpg").read_bytes())
    yolo_rows = corpus.write_yolo_folder_pointing_out(tmp / "yolo", outside)
    log = tmp / "strace.log"
    runs = [[ "--data", str(table), "--out", str(tmp / "out_table")],
            ["--data", str(tmp / "yolo"), "--out", str(tmp / "out_yolo")],
            ["--data", str(FIXTURES / "bad_inputs"), "--out", str(tmp / "out_folder")],
            ["--data", str(FIXTURES / "bad_inputs.zip"), "--out", str(tmp / "out_zip")]]
    proc = _ingest_traced(tmp, runs, log, home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"tmp": tmp, "outside": outside, "home": home, "table": table, "log": log,
            "table_rows": table_rows, "yolo_rows": yolo_rows, "stdout": proc.stdout}


def test_table_rows_that_leave_the_root_are_quarantined_and_never_touched(hostile):
    tmp, outside, home = hostile["tmp"], hostile["outside"], hostile["home"]
    rows = hostile["table_rows"]
    got = outcomes(tmp / "out_table")
    assert got == dict(rows)
    # input = used + quarantined, one outcome per table row
    used = mf.read_manifest(tmp / "out_table")
    quarantine = pd.read_csv(tmp / "out_table" / mf.QUARANTINE_FILE, keep_default_na=False)
    assert len(rows) == len(used) + len(quarantine) == 39
    assert f"{len(rows)} files" in hostile["stdout"]
    # no existence oracle: an outside file that exists and one that does not get the
    # same reason and the same detail
    detail = dict(zip(quarantine["path"], quarantine["detail"]))
    for path, outcome in rows:
        if "secret.jpg" in path and outcome == "outside_root":
            assert detail[path.replace("secret.jpg", "ghost.jpg")] == detail[path], path
    # the kernel's view: nothing outside the root was opened, stat-ed or listed
    assert touching(hostile["log"], str(outside), str(home / "secret.jpg"),
                    str(home / "ghost.jpg"), "/etc/passwd") == []
    # the symlinks inside the root were looked at (resolved first), their targets were not
    assert touching(hostile["log"], str(tmp / "root" / "imgs" / "link.jpg"))


def test_data_yaml_zip_members_and_folder_links_stay_inside(hostile):
    tmp, outside = hostile["tmp"], hostile["outside"]
    assert outcomes(tmp / "out_yolo") == dict(hostile["yolo_rows"])
    assert mf.read_classes(tmp / "out_yolo") == ["a", "b"]   # only data.yaml's names are read
    assert outcomes(tmp / "out_folder") == expected("bad_inputs/")
    assert outcomes(tmp / "out_zip") == expected("bad_inputs.zip:")
    # data.yaml's path/train/val keys, the folder corpus's escaping symlink target and
    # the ZIP's absolute and symlink members: never touched
    assert touching(hostile["log"], str(outside), str(FIXTURES / "outside.jpg"),
                    "/etc/absolute.jpg", "/etc/passwd") == []


def test_the_watch_catches_an_allowed_outside_read_and_a_stat(hostile, tmp_path):
    """The same check on runs that do reach outside: through ingest's own reader when
    the operator allows the outside folder, and a bare stat of a file that does not exist."""
    outside = hostile["outside"]
    log = tmp_path / "allowed.log"
    proc = _ingest_traced(tmp_path, [["--data", str(hostile["table"]), "--out", str(tmp_path / "o"),
                                      "--allow-root", str(outside)]], log, hostile["home"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = outcomes(tmp_path / "o")
    assert got[str(outside / "secret.jpg")] == "used"
    assert got[str(outside / "ghost.jpg")] == "missing_file"   # allowed: existence may show
    assert got["escape/secret.jpg"] == "exact_duplicate"        # a folder link into it, too
    assert got["~/secret.jpg"] == got["%2e%2e/outside-canary/secret.jpg"] == "outside_root"
    opens = [line for line in touching(log, str(outside / "secret.jpg")) if "openat(" in line]
    assert opens, "the watch must see ingest open the allowed outside file"

    log = tmp_path / "stat.log"
    traced([sys.executable, "-c", f"import os; os.path.exists({str(outside / 'ghost.jpg')!r})"], log)
    assert touching(log, str(outside / "ghost.jpg")), "the watch must see a stat"


def test_s3_table_reads_only_its_own_bucket_and_prefix(fault_proxy, tmp_path):
    """A table object in s3://bucket/data/ reads below that prefix only; the requests
    the S3 server receives show that nothing else was fetched or even asked about."""
    from triview.storage import S3Store

    corpus = _corpus_module()
    store = S3Store()
    store.client.make_bucket("other-bucket")
    picture = lambda seed: corpus._jpeg(corpus._picture(seed))   # noqa: E731
    rows = []
    for k, (name, split) in enumerate((("a1", "train"), ("a2", "val"), ("a3", "test"),
                                       ("b1", "train"), ("b2", "val"), ("b3", "test"))):
        store.put_bytes(f"s3://{BUCKET}/data/img/{name}.jpg", picture(7000 + k))
        path = f"img/{name}.jpg" if k % 2 else f"s3://{BUCKET}/data/img/{name}.jpg"
        rows.append((path, name[0], split, "used"))
    for uri in (f"s3://{BUCKET}/private/secret.jpg", f"s3://{BUCKET}/data-evil/secret.jpg",
                "s3://other-bucket/secret.jpg"):
        store.put_bytes(uri, picture(7100))
    for path in (f"s3://{BUCKET}/private/secret.jpg", f"s3://{BUCKET}/private/ghost.jpg",
                 f"s3://{BUCKET}/data-evil/secret.jpg", "s3://other-bucket/secret.jpg",
                 "s3://other-bucket/ghost.jpg", "../private/secret.jpg", "img/../../private/secret.jpg",
                 "%2e%2e/private/secret.jpg", "..\\private\\secret.jpg", "/etc/passwd",
                 f"file://{tmp_path}/x.jpg", "~/secret.jpg"):
        rows.append((path, "a", "train", "outside_root"))
    rows.append(("img/missing.jpg", "a", "train", "missing_file"))
    csv = pd.DataFrame([r[:3] for r in rows], columns=["path", "labels", "split"]).to_csv(index=False)
    store.put_bytes(f"s3://{BUCKET}/data/labels.csv", csv.encode())

    fault_proxy.seen.clear()
    result = ingest(f"s3://{BUCKET}/data/labels.csv", tmp_path / "out")
    assert outcomes(tmp_path / "out") == {r[0]: r[3] for r in rows}
    assert result.n_input == len(rows) == len(result.manifest) + len(result.quarantine)
    asked = [s for s in fault_proxy.seen if any(k in s for k in ("private", "other-bucket", "data-evil"))]
    assert asked == []
    assert any(f"/{BUCKET}/data/img/a1.jpg" in s for s in fault_proxy.seen)

    # an allowed prefix is read, and the server sees it (the check above can fail)
    fault_proxy.seen.clear()
    allowed = ingest(f"s3://{BUCKET}/data/labels.csv", tmp_path / "allowed",
                     allowed_roots=f"s3://{BUCKET}/private")
    got = dict(zip(allowed.quarantine["path"], allowed.quarantine["reason"]))
    assert f"s3://{BUCKET}/private/secret.jpg" in set(allowed.manifest["original_path"])
    assert got[f"s3://{BUCKET}/private/ghost.jpg"] == "missing_file"
    assert got["s3://other-bucket/secret.jpg"] == "outside_root"
    assert any(f"/{BUCKET}/private/secret.jpg" in s for s in fault_proxy.seen)


def test_table_rows_the_file_system_refuses_are_quarantined_not_fatal(tmp_path):
    """A NUL byte or a name longer than the file system allows makes os.lstat raise; the
    row is quarantined as read_error with the reason, and the other rows are ingested."""
    from triview.demo import write_digits

    root = tmp_path / "root"
    write_digits(root / "imgs", per_class=4)
    rows = [{"path": str(p.relative_to(root)), "label": p.parent.name}
            for p in sorted(root.rglob("*.jpg"))]
    bad = {"imgs/nul\0byte.jpg": "NUL byte", "imgs/" + "x" * 300 + ".jpg": "File name too long"}
    rows += [{"path": path, "label": "1"} for path in bad]
    for name in ("t.parquet", "t.csv"):
        table = pd.DataFrame(rows)
        table.to_parquet(root / name) if name.endswith("parquet") else table.to_csv(root / name, index=False)
        out = tmp_path / f"out-{name}"
        result = ingest(root / name, out)
        quarantine = pd.read_csv(out / mf.QUARANTINE_FILE, keep_default_na=False)
        got = dict(zip(quarantine["path"], zip(quarantine["reason"], quarantine["detail"])))
        assert len(result.manifest) == 40 and len(quarantine) == len(bad)
        for path, why in bad.items():
            assert got[path][0] == "read_error" and why in got[path][1], (path, got[path])


def test_a_sibling_folder_sharing_the_root_prefix_is_outside(tmp_path):
    """``../root-evil/x.jpg`` from ``root``: its real path starts with root's text, but it
    is not below root (a bare startswith(root) check would read it)."""
    from triview.dataroot import DataRoots
    from triview.demo import write_digits

    root, evil = tmp_path / "root", tmp_path / "root-evil"
    write_digits(root / "imgs", per_class=4)
    write_digits(evil, per_class=1)
    secret = sorted(evil.rglob("*.jpg"))[0]
    for text in (f"../root-evil/{secret.relative_to(evil)}", str(secret)):
        assert DataRoots.for_folder(root).place(text).reason == "outside_root", text
    rows = [{"path": str(p.relative_to(root)), "label": p.parent.name}
            for p in sorted(root.rglob("*.jpg"))]
    rows.append({"path": f"../root-evil/{secret.relative_to(evil)}", "label": "0"})
    pd.DataFrame(rows).to_csv(root / "t.csv", index=False)
    ingest(root / "t.csv", tmp_path / "out")
    assert outcomes(tmp_path / "out")[rows[-1]["path"]] == "outside_root"
