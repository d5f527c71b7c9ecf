from components.export.component import export  # noqa: F401
