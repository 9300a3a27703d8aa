"""Errors a user can cause. The CLI prints their message as one line and exits with code 2."""


class LowbitError(Exception):
    """Base class: the message names the bad input and the fix."""


class SchemeError(LowbitError):
    """An invalid quantization scheme (bits out of range, bad group size, unknown format)."""


class SourceError(LowbitError):
    """A model source that cannot be found or loaded."""


class DataError(LowbitError):
    """Calibration or evaluation text that is missing, empty or too short."""
