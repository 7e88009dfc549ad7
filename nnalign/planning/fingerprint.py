"""nnU-Net's dataset fingerprint without the small-dataset slowdown, and for datasets whose cases lack some
modalities."""
from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor

from nnalign.data.missing import missing_modalities, present_channels

MAX_INTENSITY_SAMPLES_PER_CASE = 100_000
PERCENTILES = (0.5, 50.0, 99.5)


class nnAlignFingerprintExtractor(DatasetFingerprintExtractor):
    """nnU-Net's extractor with at most 1e5 foreground intensity samples per case; where dataset.json records
    absent modalities (:mod:`nnalign.data.missing`), each channel's intensity statistics come from the cases that
    have it.

    nnU-Net draws 1e8 / number-of-cases samples per case, so a 5-case dataset samples 2e7 voxels per case with
    replacement and fingerprinting crawls; large datasets are unaffected by the cap.
    """

    def __init__(self, dataset_name_or_id: str | int, num_processes: int = 8, verbose: bool = False) -> None:
        super().__init__(dataset_name_or_id, num_processes, verbose)
        self.num_foreground_voxels_for_intensitystats = min(
            self.num_foreground_voxels_for_intensitystats, MAX_INTENSITY_SAMPLES_PER_CASE * max(1, len(self.dataset)))

    def run(self, overwrite_existing: bool = False) -> dict:
        """nnU-Net's fingerprint; for a dataset with absent modalities :meth:`incomplete_fingerprint` instead."""
        if not missing_modalities(self.dataset_json):
            return super().run(overwrite_existing)
        from nnunetv2.paths import nnUNet_preprocessed

        path = Path(nnUNet_preprocessed) / self.dataset_name / "dataset_fingerprint.json"
        if path.is_file() and not overwrite_existing:
            return json.loads(path.read_text())
        fingerprint = self.incomplete_fingerprint()
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.partial")
        partial.write_text(json.dumps(fingerprint, indent=4))
        os.replace(partial, path)
        return fingerprint

    def incomplete_fingerprint(self) -> dict:
        """The fingerprint nnU-Net's ``run`` writes, from the files each case has: nnU-Net's ``analyze_case`` reads
        and crops the present channels (an absent one, all zeros, would not change the crop), and a channel's
        foreground intensities are pooled over the cases that have it, so no absent channel counts as zeros."""
        from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

        cases = list(self.dataset)
        reader = determine_reader_writer_from_dataset_json(self.dataset_json, self.dataset[cases[0]]["images"][0],
                                                           verbose=False)
        per_case = int(self.num_foreground_voxels_for_intensitystats // len(cases))
        jobs = [(self.dataset[k]["images"], self.dataset[k]["label"], reader, per_case) for k in cases]
        with multiprocessing.get_context("spawn").Pool(max(1, min(self.num_processes, len(jobs)))) as pool:
            results = pool.starmap(DatasetFingerprintExtractor.analyze_case, jobs)
        samples: dict[int, list[np.ndarray]] = {c: [] for c in range(len(self.dataset_json["channel_names"]))}
        for case, (_, _, intensities, _, _) in zip(cases, results):
            for channel, values in zip(present_channels(self.dataset_json, case), intensities):
                samples[channel].append(np.asarray(values, dtype=np.float64))
        return {"spacings": [[float(s) for s in r[1]] for r in results],
                "shapes_after_crop": [[int(s) for s in r[0]] for r in results],
                "foreground_intensity_properties_per_channel": {
                    str(c): intensity_statistics(np.concatenate(v)) for c, v in samples.items()},
                "median_relative_size_after_cropping": float(np.median([r[4] for r in results]))}


def intensity_statistics(values: np.ndarray) -> dict[str, float]:
    """The per-channel statistics of nnU-Net's fingerprint (mean, median, std, min, max, 0.5 and 99.5 percentiles)
    of a channel's sampled foreground intensities."""
    low, median, high = np.percentile(values, PERCENTILES)
    return {"mean": float(np.mean(values)), "median": float(median), "std": float(np.std(values)),
            "min": float(np.min(values)), "max": float(np.max(values)), "percentile_99_5": float(high),
            "percentile_00_5": float(low)}
