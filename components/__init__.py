"""KFP faces of the triview stages: artifacts in -> library call -> artifacts out.

Every component is a Lightweight Python Component whose body imports
``triview.stages`` and calls one function; no logic lives here. The container
image is chosen at compile time (``TRIVIEW_IMAGE`` / ``TRIVIEW_GPU_IMAGE``).
"""
from components.images import CPU_IMAGE, GPU_IMAGE  # noqa: F401
