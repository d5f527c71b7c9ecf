from components.evaluate.component import evaluate  # noqa: F401
