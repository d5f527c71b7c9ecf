from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def augment(
    views: Input[Dataset],
    augmented: Output[Dataset],
    preview: Output[Markdown],
    # params: augment (generated from triview/params.py by `python -m components.codegen`)
    seed: int = 0, augment_mode: str = "offline", augment_copies: int = 0,
    noise_std: float = 0.0, max_rotation: float = 10.0, border_mode: str = "constant",
    hflip: float = 0.5, vflip: float = 0.0, shift: float = 0.0, crop_scale: float = 0.6,
    zoom: float = 0.0, brightness: float = 0.0, contrast: float = 0.0, clahe: float = 0.0,
    gray_world: float = 0.0,
    # end params
):
    """Write augmented copies of the training crops (validation and test untouched).

    Args:
        views: Cropped views dataset.
        augmented: Output folder: ``views.csv`` listing only the augmented crops,
            ``augment.json`` and ``preview.png``.
        preview: Training crops next to augmented draws of them (Markdown, image embedded).
        seed: Seed of the augmentation, resampling, initialisation, shuffling and the voter's
            folds (not of the split: see split_salt). (>= 0)
        augment_mode: offline writes augmented copies; online writes only the configuration and
            training draws fresh augmentations every epoch. (one of offline, online)
        augment_copies: Augmented copies per training crop (offline). (in [0, 100])
        noise_std: Gaussian noise sigma as a share of the 0..255 range. (in [0, 1])
        max_rotation: Rotation angle uniform in ±max_rotation degrees. (in [0, 180])
        border_mode: How rotation fills the corners. (one of constant, reflect, replicate)
        hflip: Probability of a horizontal flip (flips change some classes: digits, text). (in
            [0, 1])
        vflip: Probability of a vertical flip. (in [0, 1])
        shift: Maximum translation as a share of the side. (in [0, 1])
        crop_scale: Random resized crop inside the view: the crop keeps crop_scale..1 of its
            area (aspect 3/4..4/3) and is resized back (1: off). (in [0.05, 1])
        zoom: Scale uniform in [1 - zoom, 1 + zoom]. (in [0, 1))
        brightness: Additive brightness uniform in ±brightness of the range. (in [0, 1])
        contrast: Contrast gain uniform in [1 - contrast, 1 + contrast]. (in [0, 1])
        clahe: Probability of CLAHE on the luminance (an augmentation, not a normalisation). (in
            [0, 1])
        gray_world: Probability of gray-world white balance. (in [0, 1])
    """
    import base64

    from triview.params import pick
    from triview.stages import augment_stage

    rec = augment_stage(views.path, augmented.path, **pick("augment", locals()))
    augmented.metadata.update({"crops": rec["items_out"], "mode": rec["mode"]})
    with open(f"{augmented.path}/preview.png", "rb") as fh:
        png = base64.b64encode(fh.read()).decode()
    with open(preview.path, "w") as fh:
        fh.write("# Augmentation preview\n\nEach row: a training crop, then augmented draws.\n\n"
                 f"![preview](data:image/png;base64,{png})\n")
