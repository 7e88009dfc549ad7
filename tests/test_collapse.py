"""The warning for a model whose validation pseudo-Dice stayed 0: which regions, and what the trainer does."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from nnalign.training.common import CollapseCheck, collapsed_regions

NAN = math.nan
NAMES = ("WT", "TC", "ET")


@pytest.mark.parametrize("log, expected", [
    ([], []),
    ([[0.5, 0.2, 0.0]] * 6, ["ET"]),
    # the last third (2 of 6 epochs) decides: ET learned late, WT lost late
    ([[0.5, 0.0, 0.0]] * 4 + [[0.0, 0.0, 0.1], [0.0, 0.0, 0.2]], ["WT", "TC"]),
    # NaN (no region in references or predictions) is no evidence; all NaN is not a collapse
    ([[0.4, NAN, NAN]] * 4 + [[0.0, NAN, NAN], [0.0, 0.0, NAN]], ["WT", "TC"]),
    ([[0.4, 0.3, 0.2]] * 3, []),
    ([[0.0, 0.0, 0.0]], ["WT", "TC", "ET"]),
])
def test_collapsed_regions_by_hand(log, expected):
    assert collapsed_regions(log, NAMES) == expected


class _Trainer:
    """nnU-Net's trainer as far as the check reads it; on_train_end of the next class in line is a no-op."""

    def __init__(self, dice, tmp_path):
        self.local_rank = 0
        self.output_folder = str(tmp_path / "fold_0")
        self.logger = SimpleNamespace(local_logger=SimpleNamespace(
            my_fantastic_logging={"dice_per_class_or_region": dice}))
        self.label_manager = SimpleNamespace(num_segmentation_heads=3)
        self.logged, self.records = [], 0

    def on_train_end(self):
        pass

    def print_to_log_file(self, *args):
        self.logged.append(" ".join(map(str, args)))

    def write_settings_record(self):
        self.records += 1


class _Checked(CollapseCheck, _Trainer):
    pass


def test_a_model_whose_validation_dice_stays_zero_is_warned_about(tmp_path, capsys):
    trainer = _Checked([[0.3, 0.1, 0.0]] * 3 + [[0.0, 0.0, 0.0]] * 3, tmp_path)
    trainer.on_train_end()
    warning = trainer.collapse_warning
    assert warning is not None and "WT, TC, ET" in warning and "last 2 epochs" in warning
    assert warning.startswith(trainer.output_folder)
    assert trainer.logged == [f"WARNING: {warning}"]
    assert capsys.readouterr().err == f"nnalign_train: warning: {warning}\n"
    assert trainer.records == 1  # the settings record is rewritten with the warning


def test_a_model_that_learned_is_not_warned_about(tmp_path, capsys):
    trainer = _Checked([[0.0, 0.0, 0.0]] * 3 + [[0.6, 0.4, 0.2]] * 3, tmp_path)
    trainer.on_train_end()
    assert trainer.collapse_warning is None and trainer.logged == [] and capsys.readouterr().err == ""
    assert trainer.records == 1
