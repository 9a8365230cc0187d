"""``megadeep plan`` (filled in below)."""


def add_plan(sub) -> None:
    pass
