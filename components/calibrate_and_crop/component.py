from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def calibrate_and_crop(
    dataset: Input[Dataset],
    views: Output[Dataset],
    layout: str = "horizontal",
    overlap: float = 0.5,
    image_size: int = 32,
    calibration_file: str = "",
):
    """Undistort every image and cut three overlapping views.

    Args:
        dataset: Ingested dataset (manifest and images).
        views: Output folder: ``views.csv`` (one row per crop), the crops and ``geometry.json``.
        layout: ``horizontal`` (left/center/right) or ``vertical`` (top/center/bottom).
        overlap: Share of a window that adjacent windows have in common, in [0, 1).
        image_size: Side in pixels every crop is resized to.
        calibration_file: JSON with ``K`` and ``dist``; empty means the identity lens.
    """
    from triview.stages import calibrate_and_crop_stage

    rec = calibrate_and_crop_stage(dataset.path, views.path, layout=layout, overlap=overlap,
                                   image_size=image_size, calibration_file=calibration_file)
    views.metadata.update({"views": rec["views"], "crops": rec["items_out"], "lens": rec["lens"]})
