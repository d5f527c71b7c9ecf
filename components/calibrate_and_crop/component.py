from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def calibrate_and_crop(
    dataset: Input[Dataset],
    views: Output[Dataset],
    layout: str = "vertical",
    overlap: float = 0.5,
    image_size: int = 32,
    window: float = 0.0,
    resize: str = "stretch",
    calibration_file: str = "",
    calibration_images: str = "",
    pattern: str = "9x6",
    square: float = 1.0,
    lens_alpha: float = -1.0,
    crop_roi: bool = False,
):
    """Undistort every image and cut three overlapping views.

    Args:
        dataset: Ingested dataset (manifest and images).
        views: Output folder: ``views.csv`` (one row per crop), the crops and ``geometry.json``.
        layout: ``horizontal`` (left/center/right) or ``vertical`` (top/center/bottom).
        overlap: Share of a window that adjacent windows have in common, in [0, 1).
        image_size: Side in pixels every crop is resized to.
        window: Share of the layout axis one view spans; 0 derives it from the overlap so
            the three views exactly cover the image.
        resize: ``stretch`` to image_size², or ``letterbox`` (keep aspect, black bars).
        calibration_file: Intrinsics to apply: triview calibration JSON or OpenCV YAML/XML
            (``camera_matrix``, ``distortion_coefficients``). Empty: identity lens.
        calibration_images: Glob of chessboard photos to calibrate from (overrides
            calibration_file); the result is saved as ``calibration.json`` in ``views``.
        pattern: Chessboard inner corners, e.g. ``9x6``.
        square: Chessboard square side (any unit).
        lens_alpha: ``getOptimalNewCameraMatrix`` alpha in [0, 1]; negative keeps K.
        crop_roi: Cut undistorted images to the valid region (with lens_alpha).
    """
    from triview.stages import calibrate_and_crop_stage

    rec = calibrate_and_crop_stage(dataset.path, views.path, layout=layout, overlap=overlap,
                                   image_size=image_size, window=window, resize=resize,
                                   calibration_file=calibration_file,
                                   calibration_images=calibration_images, pattern=pattern,
                                   square=square, lens_alpha=lens_alpha, crop_roi=crop_roi)
    views.metadata.update({"views": rec["views"], "crops": rec["items_out"], "lens": rec["lens"]})
    if "calibration" in rec:
        views.metadata["calibration_rms"] = rec["calibration"]["rms"]
