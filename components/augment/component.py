from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def augment(
    views: Input[Dataset],
    augmented: Output[Dataset],
    preview: Output[Markdown],
    copies: int = 1,
    noise_std: float = 0.05,
    max_rotation: float = 50.0,
    border_mode: str = "constant",
    seed: int = 0,
    mode: str = "offline",
    hflip: float = 0.0,
    vflip: float = 0.0,
    shift: float = 0.0,
    zoom: float = 0.0,
    brightness: float = 0.0,
    contrast: float = 0.0,
    clahe: float = 0.0,
    gray_world: float = 0.0,
):
    """Write augmented copies of the training crops (validation and test untouched).

    Args:
        views: Cropped views dataset.
        augmented: Output folder: ``views.csv`` listing only the augmented crops,
            ``augment.json`` and ``preview.png``.
        preview: Training crops next to augmented draws of them (Markdown, image embedded).
        copies: Augmented copies per training crop.
        noise_std: Gaussian noise sigma as a fraction of the 0..255 range.
        max_rotation: Rotation angle is uniform in [-max_rotation, +max_rotation] degrees.
        border_mode: How rotation fills the corners: constant, reflect or replicate.
        seed: Seed; the same seed gives the same images.
        mode: ``offline`` writes the copies; ``online`` writes only the configuration and
            training draws fresh augmentations every epoch.
        hflip: Probability of a horizontal flip (off by default: flips change some classes).
        vflip: Probability of a vertical flip.
        shift: Maximum translation as a fraction of the side.
        zoom: Scale is uniform in [1 - zoom, 1 + zoom].
        brightness: Additive brightness, uniform in ±brightness of the range.
        contrast: Contrast gain, uniform in [1 - contrast, 1 + contrast].
        clahe: Probability of CLAHE on the luminance (an augmentation, not a normalisation).
        gray_world: Probability of gray-world white balance.
    """
    from triview.stages import augment_stage

    import base64

    rec = augment_stage(views.path, augmented.path, copies=copies, noise_std=noise_std,
                        max_rotation=max_rotation, border_mode=border_mode, seed=seed, mode=mode,
                        hflip=hflip, vflip=vflip, shift=shift, zoom=zoom, brightness=brightness,
                        contrast=contrast, clahe=clahe, gray_world=gray_world)
    augmented.metadata.update({"crops": rec["items_out"], "mode": rec["mode"]})
    with open(f"{augmented.path}/preview.png", "rb") as fh:
        png = base64.b64encode(fh.read()).decode()
    with open(preview.path, "w") as fh:
        fh.write("# Augmentation preview\n\nEach row: a training crop, then augmented draws.\n\n"
                 f"![preview](data:image/png;base64,{png})\n")
