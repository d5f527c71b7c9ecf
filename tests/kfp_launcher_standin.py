"""A stand-in for KFP's launcher, run inside a task's container (tests/test_containers.py).

On a cluster the task's command is wrapped by ``/kfp-launcher/launch``, which runs as
the container's user: it downloads each input artifact ``minio://bucket/key`` to
``/minio/bucket/key`` (the emptyDir KFP mounts there), runs the command with an
executor input whose URIs are the ``minio://`` ones (the SDK's executor maps them to
those local paths, ``kfp.dsl.types.artifact_types._MINIO_LOCAL_MOUNT_PREFIX``), then
uploads each output artifact's local path to its URI. This does the same with the
minio client against ``S3_ENDPOINT``.

Usage: python launch.py EXECUTOR_INPUT_JSON -- COMMAND...   (prints the executor output)
"""
import json
import os
import subprocess
import sys
from pathlib import Path

from minio import Minio

MOUNT = "/minio/"


def local_path(uri: str) -> Path:
    assert uri.startswith("minio://"), uri
    return Path(MOUNT + uri[len("minio://"):])


def split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("minio://"):].partition("/")
    return bucket, key


def main() -> int:
    executor_input = json.loads(sys.argv[1])
    command = sys.argv[sys.argv.index("--") + 1:]
    endpoint = os.environ["S3_ENDPOINT"].split("://", 1)[-1]
    client = Minio(endpoint, access_key=os.environ["AWS_ACCESS_KEY_ID"],
                   secret_key=os.environ["AWS_SECRET_ACCESS_KEY"], secure=False)
    for name, artifacts in executor_input["inputs"].get("artifacts", {}).items():
        for artifact in artifacts["artifacts"]:
            bucket, key = split(artifact["uri"])
            for obj in client.list_objects(bucket, prefix=key.rstrip("/") + "/", recursive=True):
                target = local_path(f"minio://{bucket}/{obj.object_name}")
                client.fget_object(bucket, obj.object_name, str(target))
            print(f"launcher: input {name} {artifact['uri']} -> {local_path(artifact['uri'])}")
    output_file = Path(executor_input["outputs"]["outputFile"])
    code = subprocess.run(command).returncode
    if code != 0:
        return code
    for name, artifacts in executor_input["outputs"].get("artifacts", {}).items():
        for artifact in artifacts["artifacts"]:
            source = local_path(artifact["uri"])
            bucket, key = split(artifact["uri"])
            files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
            if not files:
                print(f"launcher: output {name} wrote nothing at {source}", file=sys.stderr)
                return 1
            for file in files:
                rel = file.relative_to(source).as_posix()
                client.fput_object(bucket, key if rel == "." else f"{key}/{rel}", str(file))
            print(f"launcher: output {name} {source} -> {artifact['uri']} ({len(files)} files)")
    print("EXECUTOR_OUTPUT " + (output_file.read_text() if output_file.exists() else "{}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
