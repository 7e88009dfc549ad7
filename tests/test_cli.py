"""What every command shares: usage errors are one line with exit code 2, and the shared argument types."""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from nnalign.cli.parsing import non_negative_int, positive_int

COMMANDS = ("convert_brats", "synth", "plan_and_preprocess", "train", "predict", "evaluate", "report", "demo")


@pytest.mark.parametrize("command", COMMANDS)
def test_usage_errors_are_one_line(command):
    proc = subprocess.run([sys.executable, "-m", f"nnalign.cli.{command}", "--no-such-flag"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"nnalign_{command}: error: ")
    assert lines[0].endswith(f"(see nnalign_{command} --help)")


@pytest.mark.parametrize("parse, text, expected", [
    (positive_int, "1", 1), (positive_int, "250", 250), (non_negative_int, "0", 0), (non_negative_int, "7", 7),
])
def test_int_types_accept(parse, text, expected):
    assert parse(text) == expected


@pytest.mark.parametrize("parse, text, message", [
    (positive_int, "0", "must be 1 or more, not 0"), (positive_int, "-3", "must be 1 or more, not -3"),
    (non_negative_int, "-1", "must be 0 or more, not -1"), (positive_int, "2.5", "'2.5' is not a whole number"),
    (non_negative_int, "many", "'many' is not a whole number"),
])
def test_int_types_reject(parse, text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        parse(text)
