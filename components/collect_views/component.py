from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def collect_views(parts: Input[List[Dataset]], views: Output[Dataset]):
    """Merge the shards of a fanned-out calibrate-and-crop into one views dataset, the same
    as one calibrate-and-crop task writes.

    Args:
        parts: The shards' views (collected over the fan-out).
        views: Output folder: ``views.csv`` (one row per crop, in manifest order), the crops
            and ``geometry.json``.
    """
    from triview.stages import collect_views_stage

    rec = collect_views_stage([p.path for p in parts], views.path)
    views.metadata.update({"views": rec["views"], "crops": rec["items_out"], "shards": rec["shards"]})
    if "cache" in rec:
        views.metadata.update({"cache_hits": rec["cache"]["hits"], "cropped": rec["cache"]["computed"]})
