from components.augment.component import augment  # noqa: F401
