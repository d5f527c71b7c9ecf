"""The compiled IR carries the cluster settings; no secret ever reaches it."""
import re

import yaml

from triview import trainjob as tj
from triview.cli import main

SPEC = tj.node_spec({"views": "s3://b/v", "augmented": None, "balance": "s3://b/b"}, "s3://b/m",
                    "center", {"nodes": 2}, "run-1", False)


def _compile(tmp_path, *flags):
    out = tmp_path / "p.yaml"
    assert main(["compile", "-o", str(out), *flags]) == 0
    docs = list(yaml.safe_load_all(out.read_text()))
    return out.read_text(), docs[0], docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _container_tasks(spec, dag=None):
    """(task name, task, executor label) of every container task, the ones nested in
    the repeats condition and its loop included."""
    dag = spec["root"]["dag"] if dag is None else dag
    for name, task in dag["tasks"].items():
        comp = spec["components"][task["componentRef"]["name"]]
        if "dag" in comp:  # a condition or loop: its tasks are the containers
            yield from _container_tasks(spec, comp["dag"])
        else:
            yield name, task, comp["executorLabel"]


def _is_training(label):
    return label.startswith("exec-train-branch")


def test_every_container_task_is_seen_the_repeats_included(tmp_path):
    _, spec, _ = _compile(tmp_path)
    names = sorted(t["taskInfo"]["name"] for _, t, _ in _container_tasks(spec))
    # the stages, repeat-seeds, the loop body, the summary, deploy
    assert len(names) == 10 + 1 + 5 + 1 + 1
    assert sum(_is_training(label) for _, _, label in _container_tasks(spec)) == 6


def test_gpu_pool_toleration_and_accelerator_on_train_tasks_only(tmp_path):
    _, spec, k8s = _compile(tmp_path, "--gpu-pool", "pool=gpu-a100", "--gpu-toleration",
                            "nvidia.com/gpu", "--gpus", "2", "--cpu-pool", "pool=cpu")
    executors = spec["deploymentSpec"]["executors"]
    for _, _, label in _container_tasks(spec):
        resources = executors[label]["container"]["resources"]
        conf = k8s[label]
        if _is_training(label):
            assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
            assert resources["accelerator"]["resourceCount"] == "2"
            assert conf["nodeSelector"]["labels"] == {"pool": "gpu-a100"}
            assert conf["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists",
                                            "effect": "NoSchedule"}]
            assert conf["activeDeadlineSeconds"] == "21600"
            # nodes > 1: the TrainJob's nodes get the same image, GPUs, pool and toleration
            env = {e["name"]: e["value"] for e in executors[label]["container"]["env"]}
            job = tj.train_job("j", SPEC, 2, tj.TrainJobOptions.from_env(env))
            trainer = job["spec"]["trainer"]
            assert trainer["image"] == executors[label]["container"]["image"]
            assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "2"
            # the job's deadline ends before the task pod's, so the task can still delete it
            assert trainer["numProcPerNode"] == 2
            assert job["spec"]["activeDeadlineSeconds"] == 21600 - tj.WAIT_MARGIN_S
            pod = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"][
                "replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
            assert pod["nodeSelector"] == {"pool": "gpu-a100"}
            assert pod["tolerations"] == conf["tolerations"]
        else:
            assert not any(e["name"].startswith("TRIVIEW_TRAINJOB_")
                           for e in executors[label]["container"].get("env", []))
            assert "accelerator" not in resources
            assert conf["nodeSelector"]["labels"] == {"pool": "cpu"}
            assert "tolerations" not in conf
        assert resources["cpuLimit"] > 0 and resources["memoryLimit"] > 0


def test_retries_caching_and_secret_injection(tmp_path):
    _, spec, k8s = _compile(tmp_path)
    assert any(task["taskInfo"]["name"].startswith("train-branch") for _, task, _ in _container_tasks(spec))
    for name, task, label in _container_tasks(spec):
        assert task["retryPolicy"]["maxRetryCount"] == 3
        assert task["retryPolicy"]["backoffFactor"] == 2
        assert task["retryPolicy"]["backoffDuration"] == "60s"
        assert task["retryPolicy"]["backoffMaxDuration"] == "3600s"
        training = task["taskInfo"]["name"].startswith("train-branch")
        assert int(k8s[label]["activeDeadlineSeconds"]) == (6 * 3600 if training else 3600), name
        cached = task.get("cachingOptions", {}).get("enableCache", False)
        assert cached == (task["taskInfo"]["name"] in
                          {"ingest", "calibrate-and-crop", "balance", "augment"}), name
        env = k8s[label]["secretAsEnv"][0]
        assert env["secretName"] == "triview-minio"
        assert {e["envVar"] for e in env["keyToEnv"]} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        # the Custom Vision training key reaches the ingest task only
        names = [e["secretName"] for e in k8s[label]["secretAsEnv"]]
        assert ("triview-customvision" in names) == (task["taskInfo"]["name"] == "ingest"), name
        config = k8s[label]["configMapAsEnv"][0]
        assert config["configMapName"] == "triview-config" and config["optional"] is True
        assert {e["configMapKey"]: e["envVar"] for e in config["keyToEnv"]} == {
            "pushgateway_url": "PUSHGATEWAY_URL", "minio_endpoint": "S3_ENDPOINT",
            "s3_secure": "S3_SECURE", "s3_verify_tls": "S3_VERIFY_TLS", "s3_region": "AWS_REGION"}


def test_a_pipeline_for_several_nodes_keeps_the_waiting_task_off_the_gpus(tmp_path):
    _, spec, k8s = _compile(tmp_path, "--gpus", "0", "--node-gpus", "4", "--gpu-pool", "pool=gpu")
    executors = spec["deploymentSpec"]["executors"]
    for _, _, label in _container_tasks(spec):
        if _is_training(label):
            container = executors[label]["container"]
            assert "accelerator" not in container.get("resources", {})
            env = {e["name"]: e["value"] for e in container["env"]}
            trainer = tj.train_job("j", SPEC, 2, tj.TrainJobOptions.from_env(env))["spec"]["trainer"]
            assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "4"
            assert trainer["numProcPerNode"] == 4
    assert main(["compile", "-o", str(tmp_path / "x.yaml"), "--node-gpus", "-1"]) == 2


def test_no_gpu_options_means_no_selectors(tmp_path):
    _, spec, k8s = _compile(tmp_path, "--gpus", "0")
    for label, conf in k8s.items():
        assert "nodeSelector" not in conf and "tolerations" not in conf
    for ex in spec["deploymentSpec"]["executors"].values():
        assert "accelerator" not in ex["container"].get("resources", {})


def test_compiled_ir_holds_no_secret_values(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-v4lue-never-in-yaml")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEKEYID0001")
    text, _, _ = _compile(tmp_path, "--gpu-pool", "pool=gpu")
    assert "s3cr3t-v4lue" not in text and "AKIAEXAMPLEKEYID0001" not in text
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)
    # the IR names Secret keys, never holds their values
    assert set(re.findall(r"secretKey: (\S+)", text)) == {"accesskey", "secretkey", "training_key"}
    assert not re.search(r"(?i)password\s*[:=]", text)


def test_the_custom_vision_key_comes_from_a_secret_never_into_the_ir(tmp_path, monkeypatch):
    from triview.customvision import KEY_ENV

    key = "cv-training-key-never-in-yaml-0123456789abcdef"
    monkeypatch.setenv(KEY_ENV, key)
    text, spec, k8s = _compile(tmp_path, "--customvision-secret", "team-a-customvision")
    assert key not in text
    for name, task, label in _container_tasks(spec):
        mounts = [m for m in k8s[label]["secretAsEnv"] if m["secretName"] == "team-a-customvision"]
        if task["taskInfo"]["name"] != "ingest":
            assert not mounts, name
            continue
        assert mounts[0]["keyToEnv"] == [{"secretKey": "training_key", "envVar": KEY_ENV}]
        assert mounts[0]["optional"] is True
    # no pipeline parameter carries a key: data is an address, the key is in the environment
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert not [n for n in inputs if "key" in n.lower() or "secret" in n.lower()]


def test_bad_compile_flags_are_clear_errors(tmp_path, capsys):
    assert main(["compile", "-o", str(tmp_path / "p.yaml"), "--gpu-pool", "nolabel"]) == 2
    assert "LABEL=VALUE" in capsys.readouterr().err
    assert main(["compile", "-o", str(tmp_path / "p.yaml"), "--image", "repo/cpu:latest"]) == 2
    assert "pinned" in capsys.readouterr().err
    assert main(["compile", "-o", str(tmp_path / "p.yaml"), "--pipeline-root", "/tmp/x"]) == 2
    assert "minio://" in capsys.readouterr().err


def test_images_and_pipeline_root_are_compile_options(tmp_path):
    _, spec, _ = _compile(tmp_path, "--image", "registry.example/triview-cpu:1.2.3",
                          "--gpu-image", "registry.example/triview-gpu@sha256:" + "a" * 64,
                          "--pipeline-root", "minio://triview-artifacts/runs")
    assert spec["defaultPipelineRoot"] == "minio://triview-artifacts/runs"
    for name, _, label in _container_tasks(spec):
        image = spec["deploymentSpec"]["executors"][label]["container"]["image"]
        expected = ("registry.example/triview-gpu@sha256:" + "a" * 64 if _is_training(label)
                    else "registry.example/triview-cpu:1.2.3")
        assert image == expected, name


def test_default_images_are_pinned(tmp_path):
    _, spec, _ = _compile(tmp_path)
    images = {ex["container"]["image"] for ex in spec["deploymentSpec"]["executors"].values()}
    assert images == {"ghcr.io/triview/triview-cpu:0.1.0", "ghcr.io/triview/triview-gpu:0.1.0"}
    assert "defaultPipelineRoot" not in spec  # the cluster's kfp-launcher ConfigMap decides
