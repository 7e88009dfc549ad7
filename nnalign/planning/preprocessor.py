"""nnU-Net's preprocessing for datasets whose cases lack some modalities' files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor


def channels_of(image_files: list[str], file_ending: str) -> list[int]:
    """The channel index of each ``<case>_XXXX<file_ending>`` file."""
    return [int(Path(f).name[: -len(file_ending)][-4:]) for f in image_files]


class nnAlignPreprocessor(DefaultPreprocessor):
    """nnU-Net's ``DefaultPreprocessor``; for a case without some channels' files (recorded in dataset.json,
    :mod:`nnalign.data.missing`; nnU-Net's file lists then hold only the present ones) the present files are read
    and each absent channel is an all-zero array in memory, zero again after normalisation. No file is read or
    written for an absent channel; cropping and every present channel's normalisation are those of the present
    channels alone (a zero channel adds nothing to the nonzero mask)."""

    def run_case(self, image_files: list[str], seg_file: str | None, plans_manager, configuration_manager,
                 dataset_json: dict | str):
        if isinstance(dataset_json, str):
            dataset_json = load_json(dataset_json)
        num_channels = len(dataset_json["channel_names"])
        if len(image_files) == num_channels:
            return super().run_case(image_files, seg_file, plans_manager, configuration_manager, dataset_json)
        reader = plans_manager.image_reader_writer_class()
        present, properties = reader.read_images(image_files)
        channels = channels_of(image_files, dataset_json["file_ending"])
        data = np.zeros((num_channels, *present.shape[1:]), dtype=present.dtype)
        data[channels] = present
        seg = reader.read_seg(seg_file)[0] if seg_file is not None else None
        data, seg, properties = self.run_case_npy(data, seg, properties, plans_manager, configuration_manager,
                                                  dataset_json)
        data[[c for c in range(num_channels) if c not in channels]] = 0
        return data, seg, properties

