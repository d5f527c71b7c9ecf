from kfp import dsl
from kfp.dsl import Dataset, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def ingest(
    data: str,
    dataset: Output[Dataset],
    # params: ingest (generated from triview/params.py by `python -m components.codegen`)
    val_fraction: float = 0.15, test_fraction: float = 0.15, split_salt: str = "",
    min_size: int = 8, max_pixels: int = 100000000, label_remap: str = "", label_drop: str = "",
    min_per_class: int = 0, allowed_roots: str = "", near_duplicate_distance: int = 3,
    # end params
):
    """Decode every input image, quarantine bad files, drop duplicates, split.

    Args:
        data: Folder, ZIP (class folders, or a Roboflow/YOLO export with ``data.yaml``),
            CSV/Parquet table (multi-label), ``s3://bucket/prefix``, or an Azure Custom
            Vision project ``customvision://<endpoint host>/<project id>`` (its training key
            from the Secret the pipeline was compiled with, never a parameter).
        dataset: Output folder: ``manifest.csv``, ``quarantine.csv``, ``classes.json``,
            ``dataset.json`` (``dataset_version``), statistics and the normalised RGB images.
        val_fraction: Share of source images in the validation split, when the input gives none.
            (in [0, 1))
        test_fraction: Share of source images in the test split, when the input gives none. (in
            [0, 1))
        split_salt: Salt of the split hash: an image's split is a function of its source photo's
            id and this salt only, so it stays put as the data set grows. Change it only to draw
            a new split (empty: the default salt).
        min_size: Images whose shorter side is below this many pixels are quarantined. (>= 1)
        max_pixels: Images with more pixels are quarantined as decompression bombs. (>= 1)
        label_remap: Rename or merge labels: comma-separated old->new pairs.
        label_drop: Labels whose images are quarantined, comma-separated.
        min_per_class: Classes with fewer images are quarantined (0: keep all). (>= 0)
        allowed_roots: Comma-separated further folders or s3://bucket/prefix that table paths
            (CSV/Parquet, data.yaml) may read; by default only the data root itself (the table's
            folder, the ZIP, the s3 prefix). Any other path is quarantined as outside_root and
            never opened, stat-ed or listed.
        near_duplicate_distance: Report image pairs within this dHash Hamming distance as near
            duplicates (-1: off). (in [-1, 3])
    """
    from triview.params import pick
    from triview.stages import ingest_stage

    rec = ingest_stage(data, dataset.path, **pick("ingest", locals()))
    dataset.metadata.update({k: rec["counts"][k] for k in ("train", "val", "test", "quarantined")})
    dataset.metadata["classes"] = rec["classes"]
    dataset.metadata["dataset_version"] = rec["dataset_version"]
