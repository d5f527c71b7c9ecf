from components.ingest.component import ingest  # noqa: F401
