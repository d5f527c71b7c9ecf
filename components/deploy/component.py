from kfp import dsl
from kfp.dsl import Artifact, Input, Model, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def deploy(
    model: Input[Model],
    record: Output[Artifact],
    serve_image: str,
    # params: deploy (generated from triview/params.py by `python -m components.codegen`)
    registry: str = "", model_name: str = "triview", deploy_namespace: str = "triview",
    deploy_wait_seconds: float = 600.0,
    # end params
):
    """Serve the model this run promoted: server-side apply its KServe InferenceService
    (the ``triview-onnx`` ServingRuntime) and wait until it is Ready. When export promoted
    nothing (not blessed, or the infra validation failed), nothing is applied and the
    record says why.

    Args:
        model: The export (its stage record names the registry version it promoted).
        record: Output folder: ``stage.json``, deployed or skipped (and why), the
            InferenceService, its storageUri and status.
        serve_image: The predictor's image (the cluster's serving image, set at compile time).
        registry: Model registry: a folder or s3://bucket/prefix. Empty: no registry, no
            champion, nothing promoted.
        model_name: Model name in the registry (models/<model_name>/...).
        deploy_namespace: Kubernetes namespace of the InferenceService the deploy step applies.
        deploy_wait_seconds: How long the deploy step waits for the InferenceService to become
            Ready. (in [0, 86400])
    """
    from triview.params import pick
    from triview.stages import deploy_stage

    rec = deploy_stage(model.path, record.path, serve_image=serve_image, **pick("deploy", locals()))
    record.metadata.update({"deployed": bool(rec["deployed"]),
                            "reason": rec.get("skipped", ""),
                            "inference_service": rec.get("name", ""),
                            "storage_uri": rec.get("storage_uri", "")})
