"""Errors a user can fix. The CLI prints them as one line and exits 2, with no traceback."""


class ConfigError(ValueError):
    """A run configuration (or its DeepSpeed recipe) that cannot work, with how to fix it."""


class DataError(ConfigError):
    """Data on disk that cannot be used (missing, corrupt, made with another tokenizer), with how to fix it."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, naming the file and what is wrong with it."""


class RunAborted(RuntimeError):
    """Training stopped on purpose (e.g. too many non-finite steps in a row), saying where to resume."""
