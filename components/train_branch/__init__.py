from components.train_branch.component import train_branch  # noqa: F401
