from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def augment(
    views: Input[Dataset],
    augmented: Output[Dataset],
    copies: int = 1,
    noise_std: float = 0.05,
    max_rotation: float = 50.0,
    border_mode: str = "constant",
    seed: int = 0,
):
    """Write augmented copies of the training crops (validation and test untouched).

    Args:
        views: Cropped views dataset.
        augmented: Output folder: ``views.csv`` listing only the augmented crops.
        copies: Augmented copies per training crop.
        noise_std: Gaussian noise sigma as a fraction of the 0..255 range.
        max_rotation: Rotation angle is uniform in [-max_rotation, +max_rotation] degrees.
        border_mode: How rotation fills the corners: constant, reflect or replicate.
        seed: Seed; the same seed gives the same images.
    """
    from triview.stages import augment_stage

    rec = augment_stage(views.path, augmented.path, copies=copies, noise_std=noise_std,
                        max_rotation=max_rotation, border_mode=border_mode, seed=seed)
    augmented.metadata["crops"] = rec["items_out"]
