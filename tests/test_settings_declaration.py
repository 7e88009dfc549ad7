"""Every teacher setting is declared once (:data:`nnalign.runs.TEACHER_SETTINGS`), and the command line, the SPEC's
``[[teachers]]`` reader, the trainer-name codec and a grid run's flags are made from that declaration: a setting added
there appears in all of them."""
from __future__ import annotations

import dataclasses

import pytest

from nnalign.cli.parsing import CommandParser, add_setting_arguments, setting_values
from nnalign.errors import NnalignError
from nnalign.experiments.spec import _Table, teacher_setting_values
from nnalign.networks.anchor_registry import ANCHOR_KINDS
from nnalign.runs import (BASELINE_SETTINGS, TEACHER_SETTINGS, BaselineSpec, Setting, TeacherSpec, decode_settings,
                          encode_settings, resolve_settings, settings_flags)


def _check_rate(value: float) -> None:
    if value > 1:
        raise NnalignError(f"the test rate must be at most 1, got {value}")


ADDED = Setting("test_rate", float, "--test-rate", metavar="R", default=0.0, prefix="tr", check=_check_rate,
                help="a setting that exists only in this test")
SETTINGS = (*TEACHER_SETTINGS, ADDED)
MIXTURE = ANCHOR_KINDS["mixture"]


def test_a_setting_added_to_the_declaration_reaches_the_cli_the_spec_reader_and_the_name():
    parser = CommandParser(prog="test")
    add_setting_arguments(parser, SETTINGS)
    assert "--test-rate R" in parser.format_help()
    given = setting_values(parser.parse_args(["--test-rate", "0.25", "--separate-encoders"]), SETTINGS)
    assert given["test_rate"] == 0.25 and given["shared_encoder"] is False

    from_spec = teacher_setting_values(_Table({"test_rate": 0.25, "separate_encoders": True}, "SPEC"), SETTINGS)
    values = resolve_settings(SETTINGS, given, MIXTURE, "a teacher")
    assert resolve_settings(SETTINGS, from_spec, MIXTURE, "a teacher") == values
    tokens = encode_settings(SETTINGS, values, MIXTURE)
    assert tokens == ["sep", "drop0p5", "tr0p25"]  # declaration order; the anchor's dropout is spelled
    assert decode_settings(SETTINGS, tokens, MIXTURE) == values
    assert settings_flags(SETTINGS, values, MIXTURE) == ["--separate-encoders", "--test-rate", "0.25"]
    assert parser.parse_args(settings_flags(SETTINGS, values, MIXTURE)).test_rate == 0.25

    with pytest.raises(NnalignError, match="at most 1, got 2.0"):
        resolve_settings(SETTINGS, {"test_rate": 2}, MIXTURE, "a teacher")
    with pytest.raises(ValueError):
        decode_settings(SETTINGS, ["tr0p25", "sep"], MIXTURE)  # out of declaration order


def test_the_specs_fields_are_the_declared_settings():
    assert [f.name for f in dataclasses.fields(TeacherSpec)][1:] == sorted(
        (s.name for s in TEACHER_SETTINGS), key=[f.name for f in dataclasses.fields(TeacherSpec)].index)
    assert {f.name for f in dataclasses.fields(TeacherSpec)} == {"anchor", *(s.name for s in TEACHER_SETTINGS)}
    assert {f.name for f in dataclasses.fields(BaselineSpec)} == {s.name for s in BASELINE_SETTINGS}


def test_nnalign_train_has_one_option_per_declared_setting():
    from nnalign.cli.train import build_parser

    options = {a.dest: a for a in build_parser()._actions}
    for s in TEACHER_SETTINGS:
        assert s.dest in options and s.flag in options[s.dest].option_strings
        assert options[s.dest].help == s.help


def test_documentation_lists_every_spec_key():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "documentation" / "experiments.md").read_text()
    for s in TEACHER_SETTINGS:
        assert f"| `{s.key}` | `{s.flag}` |" in text, s.key
