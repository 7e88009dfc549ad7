"""The demo's data steps: holding cases out of a converted release and building per-subset inputs."""
import json

from nnalign.data.synthetic import write_synthetic_dataset
from nnalign.demo import _subset_inputs, hold_out, rows_markdown


def test_hold_out_moves_the_last_cases_with_all_their_files(tmp_path):
    folder = write_synthetic_dataset(tmp_path, 3, num_cases=5, shape=(32, 32, 32))
    held = hold_out(folder, 0.4)
    assert held == ["SYN_0003", "SYN_0004"]
    assert sorted(p.name for p in (folder / "labelsTs").iterdir()) == ["SYN_0003.nii.gz", "SYN_0004.nii.gz"]
    assert len(list((folder / "imagesTs").iterdir())) == 8
    assert len(list((folder / "imagesTr").iterdir())) == 12
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == 3


def test_subset_inputs_link_only_the_subset_channels(tmp_path):
    folder = write_synthetic_dataset(tmp_path / "raw", 3, num_cases=1, shape=(32, 32, 32), num_test=2)
    inputs = _subset_inputs(folder, ("T1ce", "FLAIR"), tmp_path / "in")
    names = sorted(p.name for p in inputs.iterdir())
    assert names == ["SYNTS_0000_0001.nii.gz", "SYNTS_0000_0003.nii.gz", "SYNTS_0001_0001.nii.gz",
                     "SYNTS_0001_0003.nii.gz"]
    assert all(p.resolve().parent == (folder / "imagesTs").resolve() for p in inputs.iterdir())


def test_rows_markdown_formats_each_model_row():
    table = rows_markdown([{"model": "teacher", "modalities": "T1ce", "Dice WT": 0.5, "Dice TC": 0.25, "Dice ET": 1.0}])
    assert table.splitlines()[2] == "| teacher | T1ce | 0.500 | 0.250 | 1.000 |"
