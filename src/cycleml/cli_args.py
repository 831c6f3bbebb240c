"""Plain command-line arguments (``A B``, ``--sort X``, ``--ascending``) as Hydra
overrides, for the commands whose usual form predates their Hydra config
(``cycleml compare logs/train``, ``cycleml data diff OLD NEW``). Overrides, Hydra's
own options and their values pass unchanged."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# Hydra options followed by a value (which is not a positional argument)
HYDRA_VALUE_OPTIONS = frozenset({
    "--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
    "--config-dir", "-cd", "--info", "-i", "--experimental-rerun",
})  # fmt: skip


def quoted(value: str) -> str:
    """``value`` as a quoted Hydra override value (any character allowed)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


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
            and not (index > 0 and args[index - 1] in HYDRA_VALUE_OPTIONS)
        ):
            out.append(f"{names.pop(0)}={quoted(arg)}")
        else:
            out.append(arg)
        index += 1
    return out
