from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def calibrate_and_crop(
    dataset: Input[Dataset],
    views: Output[Dataset],
    shard: int = 0,
    shards: int = 1,
    # params: calibrate-and-crop (generated from triview/params.py by `python -m components.codegen`)
    layout: str = "nested", overlap: float = 0.5, image_size: int = 224, window: float = 0.0,
    resize: str = "stretch", calibration_file: str = "", calibration_images: str = "",
    pattern: str = "9x6", square: float = 1.0, lens_alpha: float = -1.0, crop_roi: bool = False,
    cache_root: str = "",
    # end params
):
    """Undistort every image and cut three overlapping views.

    Args:
        dataset: Ingested dataset (manifest and images).
        views: Output folder: ``views.csv`` (one row per crop), the crops and ``geometry.json``.
        shard: Which part of the manifest this task crops (a fan-out, ``compile
            --crop-shards``; collect-views merges the parts).
        shards: Into how many near-equal contiguous parts the manifest is cut (1: all of it).
        layout: Where the three views lie: vertical (top/center/bottom), horizontal
            (left/center/right) or nested (whole/middle/inner: centred windows of 1,
            (1+window)/2 and window of each axis). (one of vertical, horizontal, nested)
        overlap: Share of a window that adjacent views have in common. (in [0, 1))
        image_size: Side in pixels every crop is resized to. (in [8, 1024])
        window: Share of the layout axis one view spans; 0 derives it from the overlap so that
            the three views exactly cover the image. (in [0, 1])
        resize: stretch each crop to image_size², or letterbox (keep the aspect ratio, black
            bars). (one of stretch, letterbox)
        calibration_file: Lens intrinsics to undistort with: a triview calibration JSON or an
            OpenCV YAML/XML (camera_matrix, distortion_coefficients), local or s3://. Empty:
            identity lens.
        calibration_images: Glob of chessboard photos to calibrate from in the run (overrides
            calibration_file); the result is saved as calibration.json.
        pattern: Chessboard inner corners per row x column.
        square: Chessboard square side, in any unit. (> 0)
        lens_alpha: getOptimalNewCameraMatrix alpha in [0, 1] (0: only valid pixels, 1: all
            source pixels); negative keeps K. (in [-1, 1])
        crop_roi: Cut undistorted images to their valid region (with lens_alpha).
        cache_root: Content-addressed cache kept across runs: a folder or s3://bucket/prefix.
            Crops (keyed by each photo's bytes, the lens, the crop geometry and image size) and
            frozen-backbone features (keyed by the network's weights and each crop's pixels)
            that an earlier run computed are read, not computed again: a scheduled run on grown
            data crops and extracts only its new photos. Empty: no cache.
    """
    from triview.params import pick
    from triview.stages import calibrate_and_crop_stage

    rec = calibrate_and_crop_stage(dataset.path, views.path, shard=shard, shards=shards,
                                   **pick("calibrate-and-crop", locals()))
    views.metadata.update({"views": rec["views"], "crops": rec["items_out"], "lens": rec["lens"]})
    if "cache" in rec:
        views.metadata.update({"cache_hits": rec["cache"]["hits"], "cropped": rec["cache"]["computed"]})
    if "calibration" in rec:
        views.metadata["calibration_rms"] = rec["calibration"]["rms"]
