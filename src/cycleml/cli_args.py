"""Plain command-line arguments (``A B``, ``--sort X``, ``--ascending``) as Hydra
overrides, for the commands whose usual form predates their Hydra config
(``cycleml compare logs/train``, ``cycleml data diff OLD NEW``). Overrides, Hydra's
own options and their values pass unchanged."""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import OverrideParseException

from cycleml.errors import ConfigError

# Hydra options followed by a value (which is not a positional argument)
HYDRA_VALUE_OPTIONS = frozenset({
    "--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
    "--config-dir", "-cd", "--info", "-i", "--experimental-rerun",
})  # fmt: skip
# every long option of Hydra's command line: its argparse takes an unambiguous prefix of
# one (``--config-n`` for ``--config-name``)
HYDRA_LONG_OPTIONS = frozenset({
    "--help", "--hydra-help", "--version", "--cfg", "--resolve", "--package", "--run",
    "--multirun", "--shell-completion", "--config-path", "--config-name", "--config-dir",
    "--experimental-rerun", "--info",
})  # fmt: skip


def takes_value(arg: str) -> bool:
    """Whether Hydra reads the argument after ``arg`` as its value: ``arg`` is one of
    its options that take one, or (as argparse reads it) an unambiguous prefix of one."""
    if arg in HYDRA_VALUE_OPTIONS:
        return True
    if not arg.startswith("--") or "=" in arg:
        return False
    matches = [option for option in HYDRA_LONG_OPTIONS if option.startswith(arg)]
    return len(matches) == 1 and matches[0] in HYDRA_VALUE_OPTIONS


def quoted(value: str) -> str:
    """``value`` as a quoted Hydra override value (any character allowed)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _shell_quoted(text: str) -> str:
    """``text`` in double quotes as a POSIX shell reads it."""
    return '"' + re.sub(r'([\\"$`])', r"\\\1", text) + '"'


def check_no_bare_words(args: Sequence[str], example: str) -> None:
    """Raise a ConfigError naming the first argument that is neither an override
    (``key=value``, ``+key=``, ``++key=``, ``~key``) nor one of Hydra's options or
    their values: Hydra would stop on it with its grammar's parse error. After an
    override the word is most likely the rest of a value the shell split at a space
    (``reason=first release``): the error then shows the value quoted."""
    for index, arg in enumerate(args):
        if arg.startswith(("-", "~")) or "=" in arg:
            continue
        if index > 0 and takes_value(args[index - 1]):
            continue
        split = _split_value(args, index)
        if split:
            raise ConfigError(
                f"unexpected argument '{arg}': a value with spaces needs quotes: {split}"
            )
        raise ConfigError(f"unexpected argument '{arg}': overrides are key=value, e.g. {example}")


def _split_value(args: Sequence[str], index: int) -> str:
    """The override before ``args[index]`` with the plain words from ``index`` on
    joined into its value, as a shell needs it quoted (``reason='first release'``);
    empty where that argument is no override with a plain value (an option, an
    already quoted value such as the ones :func:`as_overrides` writes)."""
    previous = args[index - 1] if index > 0 else ""
    key, sep, value = previous.partition("=")
    if not (key and sep) or previous.startswith(("-", "~")) or not args[index]:
        return ""
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return ""
    words = [value]
    for word in args[index:]:
        if not word or word.startswith(("-", "~")) or "=" in word:
            break
        words.append(word)
    return f"{key}={shlex.quote(' '.join(words))}"


def check_readable(args: Sequence[str], free_text: Sequence[str] = ()) -> None:
    """Raise a ConfigError naming the fix for an override Hydra cannot read: a value
    with a quote, ``!``, ``=`` or brackets (``reason=it's better``, a database URL with
    ``?options=...``) must be quoted as a whole; and in the ``free_text`` keys a comma
    would make a sweep of the value."""
    parser = OverridesParser.create()
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or arg.startswith("-"):
            continue
        try:
            override: Override | None = parser.parse_overrides([arg])[0]
        except OverrideParseException:
            override = None
        if override is not None and not (
            override.is_sweep_override() and key.lstrip("+") in free_text
        ):
            continue
        fixed = f"{key}={quoted(value)}" if '"' in value else f'{key}="{value}"'
        raise ConfigError(
            f"{arg}: Hydra cannot read this value as text (quotes, commas, !, =, brackets "
            f"need it quoted as a whole); write {_shell_quoted(fixed)} in a shell, so that "
            f"Hydra receives {fixed}"
        )


def as_overrides(
    args: Sequence[str],
    positional: Sequence[str],
    options: Mapping[str, str] | None = None,
    flags: Mapping[str, str] | None = None,
) -> list[str]:
    """``args`` with the plain arguments named by ``positional`` (in order), each
    ``--option value`` / ``--option=value`` of ``options`` and each ``--flag`` of
    ``flags`` written as ``key=value`` overrides."""
    options, flags = options or {}, flags or {}
    names = list(positional)
    out: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        option, _, inline = arg.partition("=")
        if option in options and (inline or index + 1 < len(args)):
            value = inline if inline else args[index + 1]
            out.append(f"{options[option]}={quoted(value)}")
            index += 1 if inline else 2
            continue
        if arg in flags:
            out.append(f"{flags[arg]}=true")
        elif (
            names
            and not arg.startswith("-")
            and "=" not in arg
            and not (index > 0 and takes_value(args[index - 1]))
        ):
            out.append(f"{names.pop(0)}={quoted(arg)}")
        else:
            out.append(arg)
        index += 1
    return out
