from components.calibrate_and_crop.component import calibrate_and_crop  # noqa: F401
