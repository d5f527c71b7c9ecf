from components.repeats.component import repeat_seeds, summarize_repeats  # noqa: F401
