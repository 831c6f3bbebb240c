"""Model references (``digits``, ``digits/3``, ``digits@champion``) and name checks.

Model names and aliases become folder names and URL path parts, so every one that
enters the registry is checked here: letters, digits, ``_``, ``.`` and ``-`` only,
not starting with ``.`` (hidden folders are the registry's staging area).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cycleml.registry.errors import RegistryError

MAX_NAME_LENGTH = 128
# versions are stored in INTEGER columns: 32 bits in PostgreSQL
MAX_VERSION = 2**31 - 1
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
_VERSION = re.compile(r"[1-9][0-9]*")


@dataclass(frozen=True)
class ModelRef:
    """A model, optionally narrowed to a version or an alias (never both)."""

    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}/{self.version}"
        if self.alias is not None:
            return f"{self.name}@{self.alias}"
        return self.name


def check_name(name: object, what: str = "model name") -> str:
    """``name`` if it is a valid model name (or alias, with ``what="alias"``)."""
    if not isinstance(name, str) or not name:
        raise RegistryError(f"{what} is empty; expected letters, digits, '_', '.' or '-'")
    if len(name) > MAX_NAME_LENGTH or not _NAME.fullmatch(name):
        raise RegistryError(
            f"{what} {name!r} is not allowed: use letters, digits, '_', '.' and '-' "
            f"(not starting with '.', at most {MAX_NAME_LENGTH} characters)"
        )
    return name


def check_alias(alias: object) -> str:
    return check_name(alias, "alias")


def check_version(version: object, name: str = "") -> int:
    """A version number (a positive integer, or its decimal text)."""
    where = f" of model '{name}'" if name else ""
    number = None
    if isinstance(version, int) and not isinstance(version, bool) and version > 0:
        number = version
    elif isinstance(version, str) and _VERSION.fullmatch(version):
        number = int(version)
    if number is not None:
        if number > MAX_VERSION:
            raise RegistryError(f"version {version!r}{where} is too large; at most {MAX_VERSION}")
        return number
    raise RegistryError(f"version {version!r}{where} is not a positive integer")


def parse_model_ref(text: str | ModelRef) -> ModelRef:
    """``digits`` | ``digits/3`` | ``digits@champion`` → :class:`ModelRef`."""
    if isinstance(text, ModelRef):
        return text
    if not isinstance(text, str):
        raise RegistryError(f"model reference {text!r} is not text")
    shown = f"model reference {text!r}"
    if text.count("@") + text.count("/") > 1:
        raise RegistryError(f"{shown}: use name, name/version or name@alias")
    try:
        if "/" in text:
            name, version = text.split("/")
            return ModelRef(check_name(name), version=check_version(version, name))
        if "@" in text:
            name, alias = text.split("@")
            return ModelRef(check_name(name), alias=check_alias(alias))
        return ModelRef(check_name(text))
    except RegistryError as err:
        raise RegistryError(f"{shown}: {err}") from None
