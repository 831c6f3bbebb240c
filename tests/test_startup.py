"""`cycleml <command> --help` answers at once: no torch, Lightning or ONNX Runtime on the way."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

import pytest

# The goal is 2 s of CPU per `--help` on a developer machine (about 1 s measured);
# the bound leaves room for a loaded test machine.
HELP_CPU_BOUND_S = 4.0
HEAVY = ("torch", "lightning", "onnxruntime", "sklearn", "matplotlib", "uvicorn", "wandb")
COMMANDS = [
    ["train"],
    ["eval"],
    ["export"],
    ["predict"],
    ["serve"],
    ["compare"],
    ["data", "gather"],
    ["data", "clean"],
    ["data", "diff"],
    ["registry", "list"],
    ["registry", "register"],
    ["monitor"],
    ["pipeline"],
    ["experiment", "report"],
]

# runs `cycleml <args>` in this process, then reports which heavy modules it imported
WRAPPER = """
import json, sys
from cycleml.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
heavy = json.loads(sys.stdin.read())
print(json.dumps(sorted(m for m in heavy if m in sys.modules)), file=sys.stderr)
"""


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_is_fast_and_imports_no_heavy_stack(command, tmp_path):
    before = children_cpu_seconds()
    result = subprocess.run(
        [sys.executable, "-c", WRAPPER, *command, "--help"],
        input=json.dumps(HEAVY),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    cpu = children_cpu_seconds() - before
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "no help printed"
    imported = json.loads(result.stderr.strip().splitlines()[-1])
    assert imported == [], f"`cycleml {' '.join(command)} --help` imported {imported}"
    assert cpu < HELP_CPU_BOUND_S, f"`cycleml {' '.join(command)} --help` took {cpu:.2f} s CPU"
