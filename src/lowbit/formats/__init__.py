"""Numeric formats; importing this package registers every format by name."""

from lowbit.formats.base import FORMATS, Format, Params, make_format
from lowbit.formats import integer  # noqa: F401  (registers "int")
from lowbit.formats import fp8  # noqa: F401  (registers "fp8_e4m3", "fp8_e5m2")
from lowbit.formats import fp4  # noqa: F401  (registers "fp4")
from lowbit.formats import nf4  # noqa: F401  (registers "nf4")
from lowbit.formats import mx  # noqa: F401  (registers "mxfp4", "mxfp8")
from lowbit.formats import nvfp4  # noqa: F401  (registers "nvfp4")
from lowbit.formats import ternary  # noqa: F401  (registers "ternary")
from lowbit.formats import gguf_blocks  # noqa: F401  (registers "gguf_q8_0" ... "gguf_q6_k")
from lowbit.formats import gguf_iq  # noqa: F401  (registers "gguf_iq3_s" ... "gguf_iq1_s")
from lowbit.formats import codebook  # noqa: F401  (registers "aqlm_2x8", "aqlm_1x16")
from lowbit.formats import e8p  # noqa: F401  (registers "e8p")

__all__ = ["FORMATS", "Format", "Params", "make_format"]
