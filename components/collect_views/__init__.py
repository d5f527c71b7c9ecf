from components.collect_views.component import collect_views  # noqa: F401
