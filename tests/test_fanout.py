"""calibrate-and-crop fanned out over shards of the manifest (``triview compile
--crop-shards N``: a ``dsl.ParallelFor`` of calibrate-and-crop tasks, merged by
collect-views): the merged views hold what one task writes (the same table, the same
crop bytes, in the same order), and a shard set that is incomplete, repeated or mixed is
refused."""

import builtins
import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_cache import _photos, _tree  # noqa: E402

CROP = {"layout": "horizontal", "image_size": 32}


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    from triview.stages import ingest_stage

    root = tmp_path_factory.mktemp("fanout")
    ingest_stage(str(_photos(root / "photos", 23)), root / "ingest", plot=False)
    return root / "ingest"


def _contents(folder: Path) -> dict:
    """A views folder's files other than its crop shards and index, with views.csv's
    crop references replaced by the crops' bytes (read through the index)."""
    from triview import manifest as mf
    from triview.shards import INDEX_FILE, read_member

    files = {k: v for k, v in _tree(folder).items()
             if not k.startswith("crops/") and k not in ("stage.json", INDEX_FILE)}
    table = mf.read_views(folder)
    files["views.csv"] = table.drop(columns="path").to_csv(index=False)
    files["crops"] = [read_member(folder, ref) for ref in table["path"]]
    return files


def _shards(ingested, root: Path, shards: int, **params) -> list[Path]:
    from triview.stages import calibrate_and_crop_stage

    out = []
    for shard in range(shards):
        folder = root / f"part-{shard}"
        rec = calibrate_and_crop_stage(ingested, folder, shard=shard, shards=shards, **{**CROP, **params})
        assert (rec["shard"], rec["shards"]) == (shard, shards)
        out.append(folder)
    return out


def test_shards_collected_are_what_one_task_writes(ingested, tmp_path):
    from triview import manifest as mf
    from triview.stages import calibrate_and_crop_stage, collect_views_stage

    whole = calibrate_and_crop_stage(ingested, tmp_path / "whole", **CROP)
    parts = _shards(ingested, tmp_path, 4)
    sizes = [mf.read_views(p)["image_id"].nunique() for p in parts]
    assert sum(sizes) == 23 and max(sizes) - min(sizes) <= 1  # near-equal parts, no overlap
    rec = collect_views_stage(list(reversed(parts)), tmp_path / "merged")  # any order
    assert (rec["items_in"], rec["items_out"], rec["shards"]) == (whole["items_in"], whole["items_out"], 4)
    assert rec["views"] == whole["views"]
    assert _contents(tmp_path / "merged") == _contents(tmp_path / "whole")
    # the parts' shards are copied whole, renumbered per view and split
    merged = sorted(p.relative_to(tmp_path / "merged").as_posix()
                    for p in (tmp_path / "merged" / "crops").rglob("*.tar"))
    expected = []
    for view in sorted(rec["views"]):
        for split in ("test", "train", "val"):
            n = sum((p / "crops" / view / split / "000000.tar").is_file() for p in parts)
            expected += [f"crops/{view}/{split}/{k:06d}.tar" for k in range(n)]
    assert merged == expected and len(merged) > 3 * 3


def test_cache_counts_add_up_over_shards(ingested, tmp_path):
    from triview.stages import collect_views_stage

    cache = str(tmp_path / "cache")
    parts = _shards(ingested, tmp_path / "a", 3, cache_root=cache)
    assert collect_views_stage(parts, tmp_path / "m1")["cache"] == {"hits": 0, "computed": 23}
    parts = _shards(ingested, tmp_path / "b", 2, cache_root=cache)  # other shards, same photos
    assert collect_views_stage(parts, tmp_path / "m2")["cache"] == {"hits": 23, "computed": 0}


def test_an_incomplete_repeated_or_mixed_set_of_shards_is_refused(ingested, tmp_path):
    from triview.stages import calibrate_and_crop_stage, collect_views_stage

    parts = _shards(ingested, tmp_path, 3)
    with pytest.raises(ValueError, match="shards 0..2 of one manifest once each"):
        collect_views_stage(parts[:2], tmp_path / "m1")
    with pytest.raises(ValueError, match="once each"):
        collect_views_stage([parts[0], parts[1], parts[1]], tmp_path / "m2")
    other = tmp_path / "other"
    calibrate_and_crop_stage(ingested, other, shard=2, shards=3, **{**CROP, "image_size": 48})
    with pytest.raises(ValueError, match="another geometry"):
        collect_views_stage([parts[0], parts[1], other], tmp_path / "m3")
    with pytest.raises(ValueError, match="not a shard"):
        collect_views_stage([tmp_path / "m3"], tmp_path / "m4")
    with pytest.raises(ValueError, match="shard 3 of 3"):
        calibrate_and_crop_stage(ingested, tmp_path / "bad", shard=3, shards=3, **CROP)


def test_a_crop_path_that_leaves_its_shard_is_refused(ingested, tmp_path):
    from triview import manifest as mf
    from triview.stages import collect_views_stage

    parts = _shards(ingested, tmp_path, 2)
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"outside")
    table = mf.read_views(parts[1])
    for ref in ("crops/../../secret.png", "../secret.png#x.png", "crops/whole/train/000009.tar#x.png"):
        table.loc[0, "path"] = ref
        mf.write_views(table, parts[1])
        with pytest.raises(ValueError, match="is not a member of a shard below crops/"):
            collect_views_stage(parts, tmp_path / "m")
        assert not (tmp_path / "m" / "secret.png").exists()
    # a shard outside crops/<view>/<split>/ in a part's index
    original = (parts[1] / "shards.json").read_text()
    name = sorted(json.loads(original)["shards"])[0]
    view = name.split("/")[1]
    for bad in (f"crops/{view}/000000.tar", f"crops/{view}/holdout/000000.tar",
                "crops/sideways/train/000000.tar"):
        index = json.loads(original)
        index["shards"][bad] = index["shards"].pop(name)
        (parts[1] / "shards.json").write_text(json.dumps(index))
        with pytest.raises(ValueError, match=r"is not below crops/<view>/<split>/"):
            collect_views_stage(parts, tmp_path / "m")


@pytest.mark.slow
def test_the_fan_out_runs_on_kfp_local_and_merges_to_one_task(ingested, tmp_path):
    """The pipeline's own fan-out (pipelines.triview_pipeline.crop_views: ParallelFor, then
    collect-views over dsl.Collected) on kfp.local's subprocess runner."""
    from kfp import dsl, local
    from kfp.dsl import Dataset

    from components.ingest import ingest
    from pipelines.platform import PlatformOptions
    from pipelines.triview_pipeline import crop_views
    from triview import params
    from triview.stages import calibrate_and_crop_stage

    data = tmp_path / "photos"
    shutil.copytree(Path(ingested).parent / "photos", data)
    values = {**params.defaults(), **CROP}

    @dsl.pipeline(name="crop-fan-out")
    def fan_out(data: str) -> Dataset:
        ingest_task = ingest(data=data, **params.pick("ingest", values))
        return crop_views(ingest_task.outputs["dataset"], values,
                          PlatformOptions(crop_shards=3, crop_parallelism=2))

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"),
               raise_on_error=True)
    # kfp.local indents task logs by swapping builtins.print; with a ParallelFor its swaps can
    # interleave and leave the indenting print in place: put the real one back
    real_print = builtins.print
    try:
        merged = Path(fan_out(data=str(data)).output.path)
    finally:
        builtins.print = real_print
    single = tmp_path / "single"
    calibrate_and_crop_stage(ingested, single, **CROP)
    stage = json.loads((merged / "stage.json").read_text())
    assert stage["shards"] == 3 and stage["items_in"] == 23
    assert _contents(merged) == _contents(single)


def test_the_compiled_fan_out(tmp_path, capsys):
    """``compile --crop-shards 4 --crop-parallelism 2``: a ParallelFor of four
    calibrate-and-crop tasks, two at a time, each told its shard, collected by collect-views,
    which every later stage reads; the default IR has one calibrate-and-crop task."""
    import yaml

    from triview.cli import main

    def compile_(*flags):
        out = tmp_path / "p.yaml"
        assert main(["compile", "-o", str(out), *flags]) == 0
        return next(yaml.safe_load_all(out.read_text()))

    spec = compile_("--crop-shards", "4", "--crop-parallelism", "2")
    root = spec["root"]["dag"]["tasks"]
    (loop_name,) = [n for n, t in root.items() if t["taskInfo"]["name"] == "crop-shards"]
    loop = root[loop_name]
    assert loop["iteratorPolicy"]["parallelismLimit"] == 2
    assert json.loads(loop["parameterIterator"]["items"]["raw"]) == [0, 1, 2, 3]
    body = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    (crop,) = body.values()
    params = crop["inputs"]["parameters"]
    assert params["shards"]["runtimeValue"]["constant"] == 4
    assert params["shard"]["componentInputParameter"] == loop["parameterIterator"]["itemInput"]
    collect = root["collect-views"]
    (parts,) = collect["inputs"]["artifacts"].values()
    assert parts["taskOutputArtifact"]["producerTask"] == loop_name
    assert collect["cachingOptions"]["enableCache"] is True
    for name in ("balance", "augment", "evaluate", "export"):
        assert root[name]["inputs"]["artifacts"]["views"]["taskOutputArtifact"]["producerTask"] \
            == "collect-views", name
    default = compile_()["root"]["dag"]["tasks"]
    assert "collect-views" not in default and "calibrate-and-crop" in default
    for bad in ("0", "1001"):
        assert main(["compile", "-o", str(tmp_path / "x.yaml"), "--crop-shards", bad]) == 2
        assert "--crop-shards must be in [1, 1000]" in capsys.readouterr().err
