"""Numeric formats; importing this package registers every format by name."""

from lowbit.formats.base import FORMATS, Format, Params, make_format
from lowbit.formats import integer  # noqa: F401  (registers "int")

__all__ = ["FORMATS", "Format", "Params", "make_format"]
