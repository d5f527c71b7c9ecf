from components.train_voter.component import train_voter  # noqa: F401
