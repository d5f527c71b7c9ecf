from kfp import dsl
from kfp.dsl import Dataset, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def ingest(
    data: str,
    dataset: Output[Dataset],
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    min_size: int = 8,
):
    """Decode every input image, quarantine bad files, drop duplicates, split.

    Args:
        data: Folder or ZIP archive of class folders (``<class>/<image>``).
        dataset: Output folder: ``manifest.csv``, ``quarantine.csv``, ``classes.json``
            and the normalised RGB images.
        seed: Seed of the stratified, source-grouped train/val/test split.
        val_fraction: Share of source images in the validation split.
        test_fraction: Share of source images in the test split.
        min_size: Images whose shorter side is below this many pixels are quarantined.
    """
    from triview.stages import ingest_stage

    rec = ingest_stage(data, dataset.path, seed=seed, val_fraction=val_fraction,
                       test_fraction=test_fraction, min_size=min_size)
    dataset.metadata.update({k: rec["counts"][k] for k in ("train", "val", "test", "quarantined")})
    dataset.metadata["classes"] = rec["classes"]
