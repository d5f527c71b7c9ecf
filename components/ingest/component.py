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
    label_remap: str = "",
    label_drop: str = "",
    min_per_class: int = 0,
):
    """Decode every input image, quarantine bad files, drop duplicates, split.

    Args:
        data: Folder, ZIP (class folders, or a Roboflow/YOLO export with ``data.yaml``),
            CSV/Parquet table (multi-label) or ``s3://bucket/prefix``.
        dataset: Output folder: ``manifest.csv``, ``quarantine.csv``, ``classes.json``,
            ``dataset.json`` (``dataset_version``), statistics and the normalised RGB images.
        seed: Seed of the stratified, source-grouped train/val/test split.
        val_fraction: Share of source images in the validation split.
        test_fraction: Share of source images in the test split.
        min_size: Images whose shorter side is below this many pixels are quarantined.
        label_remap: Rename/merge labels, comma-separated ``old->new`` pairs.
        label_drop: Labels whose images are quarantined, comma-separated.
        min_per_class: Classes with fewer images are quarantined (0: keep all).
    """
    from triview.ingest import parse_remap
    from triview.stages import ingest_stage

    rec = ingest_stage(data, dataset.path, seed=seed, val_fraction=val_fraction,
                       test_fraction=test_fraction, min_size=min_size,
                       remap=parse_remap([label_remap]),
                       drop=tuple(d.strip() for d in label_drop.split(",") if d.strip()),
                       min_per_class=min_per_class)
    dataset.metadata.update({k: rec["counts"][k] for k in ("train", "val", "test", "quarantined")})
    dataset.metadata["classes"] = rec["classes"]
    dataset.metadata["dataset_version"] = rec["dataset_version"]
