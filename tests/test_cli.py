"""What every command shares: usage errors are one line with exit code 2, the shared argument types, the one-line
form of other errors' messages, and the device set-up of training and prediction."""
from __future__ import annotations

import argparse
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from nnalign.cli.parsing import non_negative_int, positive_int
from nnalign.device import setup_device
from nnalign.errors import MAX_LINE, NnalignError, one_line

#: Every installed ``nnalign_*`` command's module under nnalign.cli (setup.py's console scripts).
COMMANDS = tuple(sorted(e.module.rsplit(".", 1)[1] for e in entry_points(group="console_scripts")
                        if e.name.startswith("nnalign_")))


def test_the_commands_come_from_the_installed_package():
    """The parametrised command tests below would run for no command if the package were not installed."""
    assert {"train", "predict", "plan_and_preprocess"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_usage_errors_are_one_line(command):
    proc = subprocess.run([sys.executable, "-m", f"nnalign.cli.{command}", "--no-such-flag"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"nnalign_{command}: error: ")
    assert lines[0].endswith(f"(see nnalign_{command} --help)")


HELP_IMPORTS = ("import contextlib, io, runpy, sys\n"
                "sys.argv = ['nnalign_{command}', '--help']\n"
                "try:\n"
                "    with contextlib.redirect_stdout(io.StringIO()):\n"
                "        runpy.run_module('nnalign.cli.{command}', run_name='__main__')\n"
                "except SystemExit as exit:\n"
                "    print(exit.code, sorted(m for m in ('torch', 'nnunetv2', 'matplotlib') if m in sys.modules))\n")


@pytest.mark.parametrize("command", COMMANDS)
def test_help_answers_without_importing_torch_or_nnunet(command):
    """What keeps ``--help`` at a fraction of a second: torch alone takes seconds to import (the times are measured by
    benchmarks/cli_startup.py, not here)."""
    proc = subprocess.run([sys.executable, "-c", HELP_IMPORTS.format(command=command)], capture_output=True, text=True,
                          timeout=60)
    assert proc.stdout.strip().splitlines()[-1] == "0 []", (proc.stdout, proc.stderr)


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


@pytest.mark.parametrize("error, expected", [
    (RuntimeError("Exception thrown in SimpleITK ImageFileReader_Execute: sitkImageReaderBase.cxx:97:\n"
                  "sitk::ERROR: The file \"a.nii.gz\" does not exist."),
     "Exception thrown in SimpleITK ImageFileReader_Execute: sitkImageReaderBase.cxx:97: sitk::ERROR: The file "
     "\"a.nii.gz\" does not exist."),
    (AssertionError("  two\n\n   lines  "), "two lines"),
    (ValueError(), "ValueError"),
    (OSError(" \n "), "OSError"),
])
def test_one_line_keeps_every_line_of_a_message_on_one(error, expected):
    assert one_line(error) == expected


def test_one_line_cuts_a_long_message():
    text = one_line(RuntimeError("word " * 200))
    assert len(text) == MAX_LINE and text.endswith("...")


def test_setup_device_says_in_one_line_what_is_missing(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(NnalignError, match=r"^-device cuda: no CUDA GPU is available \(use -device cpu\)$"):
        setup_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(NnalignError, match=r"^--num-gpus 2: only 1 GPUs are visible$"):
        setup_device("cuda", num_gpus=2)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(NnalignError, match=r"^-device mps: MPS is not available \(use -device cpu\)$"):
        setup_device("mps")
