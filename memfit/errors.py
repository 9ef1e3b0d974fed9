"""Errors memfit raises on purpose. The CLI turns any `MemfitError` into one clear line and a non-zero exit."""


class MemfitError(Exception):
    """Base class: a user-facing problem with a message that says what to do."""


class ModelLoadError(MemfitError):
    """The model could not be found, fetched or loaded."""


class ConfigError(MemfitError):
    """Bad user input: unknown method, bad budget, unknown parameter, empty prompt..."""
