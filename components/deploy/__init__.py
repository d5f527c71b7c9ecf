from components.deploy.component import deploy  # noqa: F401
