"""Errors a user can fix. The CLI prints them as one line and exits 2, with no traceback."""


class ConfigError(ValueError):
    """A run configuration (or its DeepSpeed recipe) that cannot work, with how to fix it."""


class DataError(ConfigError):
    """Data on disk that cannot be used (missing, corrupt, made with another tokenizer), with how to fix it."""
