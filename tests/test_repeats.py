"""Repeats over seeds: mean and SD of every metric, the seeds of the fan-out, and the run
id of a fan-out task (the DAG itself runs in test_e2e.py)."""
import json

import pytest


def test_repeats_aggregate_mean_and_sd():
    from triview.summary import aggregate_repeats

    runs = [{"views": {"left": {"macro_f1": f, "accuracy": 0.5}}, "ensemble": {"macro_f1": f + 0.1,
                                                                           "method": "mean"}}
            for f in (0.6, 0.7, 0.8)]
    rep = aggregate_repeats(runs, [0, 1, 2])
    assert rep["n"] == 3 and rep["seeds"] == [0, 1, 2]
    assert rep["views"]["left"]["macro_f1"]["mean"] == pytest.approx(0.7)
    assert rep["views"]["left"]["macro_f1"]["sd"] == pytest.approx(0.1)
    assert rep["views"]["left"]["accuracy"]["sd"] == 0.0
    assert rep["ensemble"]["macro_f1"]["values"] == pytest.approx([0.7, 0.8, 0.9])
    assert "method" not in rep["ensemble"]


def test_repeat_seeds_and_the_repeats_stage(tmp_path):
    from triview.runinfo import stage_record
    from triview.stages import repeat_seeds, repeats_stage

    assert repeat_seeds(5, 3) == [6, 7] and repeat_seeds(0, 1) == []
    with pytest.raises(ValueError, match="at least 1"):
        repeat_seeds(0, 0)
    dirs = []
    for seed, f1 in ((2, 0.8), (0, 0.6), (1, 0.7)):  # collected in any order
        d = tmp_path / f"eval-{seed}"
        with stage_record("evaluate" if seed == 0 else f"evaluate-seed-{seed}", d) as rec:
            rec.update(seed=seed, views={"left": {"macro_f1": f1 - 0.1}},
                       ensemble={"macro_f1": f1, "method": "mean"})
        dirs.append(d)
    rec = repeats_stage(dirs, tmp_path / "summary")
    rep = json.loads((tmp_path / "summary" / "repeats.json").read_text())
    assert rep == rec["repeats"] and rep["seeds"] == [0, 1, 2]
    assert rep["ensemble"]["macro_f1"]["values"] == pytest.approx([0.6, 0.7, 0.8])
    assert rep["ensemble"]["macro_f1"]["sd"] == pytest.approx(0.1)
    assert rep["views"]["left"]["macro_f1"]["mean"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="share a seed"):
        repeats_stage(dirs + dirs[:1], tmp_path / "again")


def test_metrics_run_id_of_a_fan_out_task_is_its_run():
    from triview.metrics import run_id_for

    assert run_id_for("/root/triview-1/train-branch/model") == "triview-1"
    assert run_id_for("/root/triview-1/for-loop-2-iteration-1/train-branch-4/model") == "triview-1"
