"""Errors a user can hit. Each message names the input that was wrong and what to do."""


class CycleMLError(Exception):
    """An error caused by user input (config, files, data), reported without a traceback."""


class ConfigError(CycleMLError):
    """A config value is missing, unknown or inconsistent."""


class DataError(CycleMLError):
    """Input data is missing, empty or unreadable."""


class BundleError(CycleMLError):
    """A model bundle is missing, incomplete or inconsistent."""
