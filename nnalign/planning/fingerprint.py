"""nnU-Net's dataset fingerprint without the small-dataset slowdown."""
from __future__ import annotations

from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor

MAX_INTENSITY_SAMPLES_PER_CASE = 100_000


class nnAlignFingerprintExtractor(DatasetFingerprintExtractor):
    """nnU-Net's extractor with at most 1e5 foreground intensity samples per case.

    nnU-Net draws 1e8 / number-of-cases samples per case, so a 5-case dataset samples 2e7 voxels per case with
    replacement and fingerprinting crawls; large datasets are unaffected by the cap.
    """

    def __init__(self, dataset_name_or_id: str | int, num_processes: int = 8, verbose: bool = False) -> None:
        super().__init__(dataset_name_or_id, num_processes, verbose)
        self.num_foreground_voxels_for_intensitystats = min(
            self.num_foreground_voxels_for_intensitystats, MAX_INTENSITY_SAMPLES_PER_CASE * max(1, len(self.dataset)))
