"""Cluster settings applied to the DAG's tasks at compile time (kfp + kfp-kubernetes).

kfp.local ignores all of these (resources, accelerators, node selectors, tolerations,
secrets, timeouts); Kubeflow Pipelines applies them to each task's pod.
"""
from dataclasses import dataclass, field

from kfp import kubernetes

from components.images import CPU_IMAGE, GPU_IMAGE, SERVE_IMAGE
from triview.customvision import KEY_ENV as CUSTOMVISION_KEY_ENV
from triview.trainjob import TrainJobOptions

#: ConfigMap keys -> the run pods' environment (triview.metrics, triview.storage).
CONFIG_ENV = {"pushgateway_url": "PUSHGATEWAY_URL", "minio_endpoint": "S3_ENDPOINT",
              "s3_secure": "S3_SECURE", "s3_verify_tls": "S3_VERIFY_TLS", "s3_region": "AWS_REGION"}

#: Stages whose outputs depend only on their inputs: cached, keyed by the data version.
CACHED = {"ingest", "calibrate-and-crop", "collect-views", "balance", "augment"}


@dataclass
class Resources:
    cpu_request: str
    cpu_limit: str
    memory_request: str
    memory_limit: str
    timeout_s: int


@dataclass
class PlatformOptions:
    """What a platform team chooses when compiling the pipeline for its cluster."""
    gpus: int = 1                                    # per train-branch task (0: CPU only)
    node_gpus: int | None = None                     # per node of a TrainJob (None: gpus)
    accelerator: str = "nvidia.com/gpu"
    gpu_pool: tuple[str, str] | None = None          # node label (key, value) of the GPU pool
    gpu_toleration: str | None = None                # taint key on the GPU nodes (Exists, NoSchedule)
    cpu_pool: tuple[str, str] | None = None          # node label of the CPU pool for light stages
    minio_secret: str = "triview-minio"              # Secret with accesskey / secretkey
    customvision_secret: str = "triview-customvision"  # Secret with training_key (ingest only)
    config_map: str = "triview-config"               # ConfigMap with pushgateway_url
    image: str = CPU_IMAGE                           # light stages
    gpu_image: str = GPU_IMAGE                       # train-branch
    serve_image: str = SERVE_IMAGE                   # the predictor the deploy step applies
    pipeline_root: str | None = None                 # minio://bucket/path; None: the cluster's
    retries: int = 3
    repeat_parallelism: int | None = None             # repeats trained at once (None: all)
    crop_shards: int = 1                             # calibrate-and-crop tasks (a fan-out)
    crop_parallelism: int | None = None              # of them at once (None: all)
    backoff: str = "60s"
    backoff_factor: float = 2.0
    backoff_max: str = "3600s"
    light: Resources = field(default_factory=lambda: Resources("1", "2", "2Gi", "8Gi", 3600))
    train: Resources = field(default_factory=lambda: Resources("4", "8", "16Gi", "32Gi", 6 * 3600))

    @property
    def secret_env(self) -> dict[str, str]:
        """Secret key -> environment variable, as the minio/S3 clients expect them."""
        return {"accesskey": "AWS_ACCESS_KEY_ID", "secretkey": "AWS_SECRET_ACCESS_KEY"}

    @property
    def customvision_secret_env(self) -> dict[str, str]:
        """Secret key -> environment variable of the Custom Vision training key."""
        return {"training_key": CUSTOMVISION_KEY_ENV}


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"expected LABEL=VALUE, got {text!r}")
    return key, value


PIPELINE_ROOT_SCHEMES = ("minio", "s3", "gs")


def check_pipeline_root(pipeline_root: str | None) -> str | None:
    if pipeline_root is None:
        return None
    scheme, sep, rest = pipeline_root.partition("://")
    if not sep or scheme not in PIPELINE_ROOT_SCHEMES or not rest.strip("/"):
        raise ValueError(f"--pipeline-root must look like minio://bucket/path (or s3://, gs://), "
                         f"got {pipeline_root!r}")
    return pipeline_root


def options_from_flags(*, gpus: int | None = None, node_gpus: int | None = None,
                       crop_shards: int | None = None, crop_parallelism: int | None = None,
                       gpu_pool: str | None = None,
                       gpu_toleration: str | None = None, cpu_pool: str | None = None,
                       minio_secret: str | None = None, customvision_secret: str | None = None,
                       image: str | None = None,
                       gpu_image: str | None = None, serve_image: str | None = None,
                       pipeline_root: str | None = None) -> PlatformOptions | None:
    """``PlatformOptions`` from the CLI's cluster flags; None when every flag is unset
    (the committed IR's defaults)."""
    given = {"gpus": gpus, "node_gpus": node_gpus, "crop_shards": crop_shards,
             "crop_parallelism": crop_parallelism, "gpu_pool": gpu_pool, "gpu_toleration": gpu_toleration,
             "cpu_pool": cpu_pool, "minio_secret": minio_secret,
             "customvision_secret": customvision_secret, "image": image,
             "gpu_image": gpu_image, "serve_image": serve_image, "pipeline_root": pipeline_root}
    if all(v is None for v in given.values()):
        return None
    for flag, value in (("gpus", gpus), ("node-gpus", node_gpus)):
        if value is not None and value < 0:
            raise ValueError(f"--{flag} must be 0 or more, got {value}")
    for flag, value in (("crop-shards", crop_shards), ("crop-parallelism", crop_parallelism)):
        if value is not None and not 1 <= value <= 1000:
            raise ValueError(f"--{flag} must be in [1, 1000], got {value}")
    for flag in ("image", "gpu_image", "serve_image"):
        value = given[flag]
        if value is not None and (":" not in value.rsplit("/", 1)[-1] and "@" not in value
                                  or value.endswith(":latest")):
            raise ValueError(f"--{flag.replace('_', '-')} must be pinned by tag or digest "
                             f"(not :latest), got {value!r}")
    check_pipeline_root(pipeline_root)
    for flag in ("gpu_pool", "cpu_pool"):
        if given[flag] is not None:
            given[flag] = _label(given[flag])
    return PlatformOptions(**{k: v for k, v in given.items() if v is not None})


def configure_task(task, stage: str, options: PlatformOptions, gpu: bool = False):
    """Resources, placement, retries, caching, timeout and credentials for one task."""
    res = options.train if gpu else options.light
    task.set_container_image(options.gpu_image if gpu else options.image)
    task.set_cpu_request(res.cpu_request).set_cpu_limit(res.cpu_limit)
    task.set_memory_request(res.memory_request).set_memory_limit(res.memory_limit)
    if gpu and options.gpus > 0:
        task.set_accelerator_type(options.accelerator).set_accelerator_limit(options.gpus)
        if options.gpu_pool:
            kubernetes.add_node_selector(task, *options.gpu_pool)
        if options.gpu_toleration:
            kubernetes.add_toleration(task, key=options.gpu_toleration, operator="Exists",
                                      effect="NoSchedule")
    elif options.cpu_pool:
        kubernetes.add_node_selector(task, *options.cpu_pool)
    # Training resumes from its last checkpoint, so a retried task loses little work.
    if options.retries > 0:
        task.set_retry(num_retries=options.retries, backoff_duration=options.backoff,
                       backoff_factor=options.backoff_factor,
                       backoff_max_duration=options.backoff_max)
    task.set_caching_options(enable_caching=stage in CACHED)
    kubernetes.set_timeout(task, res.timeout_s)
    # From a ConfigMap (platform config), not set_env_variable: kfp.local would apply an
    # env var too and point local runs at the in-cluster Pushgateway.
    kubernetes.use_config_map_as_env(task, config_map_name=options.config_map,
                                     config_map_key_to_env=CONFIG_ENV, optional=True)
    kubernetes.use_secret_as_env(task, secret_name=options.minio_secret,
                                 secret_key_to_env=options.secret_env, optional=True)
    if stage == "train-branch":  # nodes > 1: where its TrainJob's nodes run (triview.trainjob)
        for name, value in TrainJobOptions.env_of(
                image=options.gpu_image, cpu=options.train.cpu_limit,
                gpus=options.gpus if options.node_gpus is None else options.node_gpus,
                memory=options.train.memory_limit, minio_secret=options.minio_secret,
                node_selector=options.gpu_pool, toleration=options.gpu_toleration,
                timeout_s=options.train.timeout_s).items():
            task.set_env_variable(name, value)
    if stage == "ingest":   # the one task that reads a customvision:// data source
        kubernetes.use_secret_as_env(task, secret_name=options.customvision_secret,
                                     secret_key_to_env=options.customvision_secret_env,
                                     optional=True)
    return task
