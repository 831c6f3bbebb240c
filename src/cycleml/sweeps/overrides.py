"""Python values written as Hydra command-line overrides (``key=value``)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from hydra.core.override_parser.types import Quote, QuotedString

# Strings that Hydra reads back as the same string without quotes. Anything else
# (spaces, commas, brackets, quotes, `$`, words Hydra reads as bool/null/number) is quoted.
_PLAIN = re.compile(r"[A-Za-z_][\w\-./]*")
_RESERVED = {"true", "false", "null", "inf", "nan"}


def override_value(value: Any) -> str:
    """``value`` in Hydra's override grammar, so that Hydra parses it back to ``value``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        if _PLAIN.fullmatch(value) and value.lower() not in _RESERVED:
            return value
        return QuotedString(text=value, quote=Quote.single).with_quotes()
    if isinstance(value, Mapping):
        items = ",".join(f"{override_value(str(k))}:{override_value(v)}" for k, v in value.items())
        return "{" + items + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    raise TypeError(f"cannot write a {type(value).__name__} as a Hydra override: {value!r}")


def override(key: str, value: Any) -> str:
    """``key=value`` with ``value`` written by :func:`override_value`."""
    return f"{key}={override_value(value)}"
