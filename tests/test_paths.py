"""nnU-Net's dataset folder names and finding a dataset by ID or name (nnalign.paths)."""
from __future__ import annotations

import pytest

from nnalign.errors import NnalignError
from nnalign.paths import dataset_folders, dataset_glob, dataset_id_of, dataset_name, resolve_dataset


def test_dataset_names_globs_and_ids():
    assert dataset_name(18, "BraTS2018") == "Dataset018_BraTS2018"
    assert dataset_glob("*", 7) == "Dataset007_*" and dataset_glob("X") == "Dataset[0-9][0-9][0-9]_X"
    assert [dataset_id_of(n) for n in ("Dataset018_BraTS2018", "Dataset18_X", "Dataset018_", "x")] == [18, None, None,
                                                                                                        None]


def test_dataset_folders_are_the_folders_of_one_id(tmp_path):
    for name in ("Dataset007_B", "Dataset007_A", "Dataset070_C"):
        (tmp_path / name).mkdir()
    (tmp_path / "Dataset007_file").write_text("")
    assert [p.name for p in dataset_folders(tmp_path, 7)] == ["Dataset007_A", "Dataset007_B"]
    assert dataset_folders(tmp_path / "missing", 7) == []


@pytest.fixture
def roots(tmp_path):
    """A preprocessed root holding Dataset018_BraTS2018, Dataset020_Twin and Dataset021_Twin; a raw root holding
    those and Dataset030_RawOnly."""
    pre, raw = tmp_path / "pre", tmp_path / "raw"
    for name in ("Dataset018_BraTS2018", "Dataset020_Twin", "Dataset021_Twin"):
        (pre / name).mkdir(parents=True)
        (raw / name).mkdir(parents=True)
    (raw / "Dataset030_RawOnly").mkdir()
    return pre, raw


@pytest.mark.parametrize("spec, found", [
    ("18", "Dataset018_BraTS2018"), (" 018 ", "Dataset018_BraTS2018"), ("Dataset018_BraTS2018", "Dataset018_BraTS2018"),
    ("BraTS2018", "Dataset018_BraTS2018"), ("BraTS*", "Dataset018_BraTS2018"), ("Dataset020_Twin", "Dataset020_Twin"),
])
def test_resolve_dataset_by_id_or_name(roots, spec, found):
    assert resolve_dataset(spec, *roots) == found


@pytest.mark.parametrize("spec, message", [
    ("Twin", "dataset 'Twin' matches several folders in {pre}: Dataset020_Twin, Dataset021_Twin"),
    ("30", "dataset Dataset030_RawOnly is not preprocessed (nothing in {pre}): run nnalign_plan_and_preprocess -d 30"),
    ("RawOnly", "dataset Dataset030_RawOnly is not preprocessed (nothing in {pre}): run nnalign_plan_and_preprocess "
                "-d 30"),
    ("Dataset030_RawOnly", "dataset Dataset030_RawOnly is not preprocessed (nothing in {pre}): run "
                           "nnalign_plan_and_preprocess -d 30"),
    ("99", "no dataset '99' in {pre} or {raw} (make one with nnalign_synth or nnalign_convert_brats, then run "
           "nnalign_plan_and_preprocess)"),
    ("Dataset018_Other", "no dataset 'Dataset018_Other' in {pre} or {raw} (make one with nnalign_synth or "
                         "nnalign_convert_brats, then run nnalign_plan_and_preprocess)"),
])
def test_resolve_dataset_says_what_to_run(roots, spec, message):
    pre, raw = roots
    with pytest.raises(NnalignError) as caught:
        resolve_dataset(spec, pre, raw)
    assert str(caught.value) == message.format(pre=pre, raw=raw)


def test_resolve_dataset_without_folders(tmp_path):
    with pytest.raises(NnalignError, match="^no dataset '1' in "):
        resolve_dataset("1", tmp_path / "pre", tmp_path / "raw")
