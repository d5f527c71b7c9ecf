"""Container images the components run in on a cluster (ignored by kfp.local)."""
import os

#: Light stages (ingest, preprocessing, voter, evaluate, export).
CPU_IMAGE = os.environ.get("TRIVIEW_IMAGE", "ghcr.io/triview/triview-cpu:0.1.0")
#: Training stages (CUDA build of the pinned torch).
GPU_IMAGE = os.environ.get("TRIVIEW_GPU_IMAGE", "ghcr.io/triview/triview-gpu:0.1.0")
#: The KServe predictor (triview serve, no torch) the deploy step puts in the InferenceService.
SERVE_IMAGE = os.environ.get("TRIVIEW_SERVE_IMAGE", "ghcr.io/triview/triview-serve:0.1.0")
