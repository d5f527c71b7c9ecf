from components.balance.component import balance  # noqa: F401
