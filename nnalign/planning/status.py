"""Where a dataset stands between planning and training: its plans, its training cases, and which of them a
configuration has preprocessed. Read by ``nnalign_train``, ``nnalign_experiment`` and the demo; nothing here imports
torch or nnU-Net."""
from __future__ import annotations

import json
from pathlib import Path

from nnalign.errors import NnalignError
from nnalign.model_folders import PLANS_NAME
from nnalign.paths import dataset_id_of

INCOMPLETE_MARKER = "nnalign_preprocessing_incomplete"
"""A file in a preprocessed dataset folder while nnalign_plan_and_preprocess works on it: written before anything
else, removed after everything else. A folder that holds it was left by a run that failed or was interrupted."""


def configuration_value(plans: dict, configuration: str, key: str):
    """A configuration's ``key``, following ``inherits_from``."""
    configurations, seen = plans["configurations"], set()
    while configuration in configurations and configuration not in seen:
        seen.add(configuration)
        if key in configurations[configuration]:
            return configurations[configuration][key]
        configuration = configurations[configuration].get("inherits_from")
    return None


def read_plans(preprocessed: Path, configuration: str) -> dict | None:
    """The nnalign plans of a preprocessed dataset if they hold ``configuration``, else None."""
    try:
        plans = json.loads((preprocessed / f"{PLANS_NAME}.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(plans, dict) or configuration not in (plans.get("configurations") or {}):
        return None
    return plans


def training_cases(raw: Path) -> list[str] | None:
    """The training case IDs of a raw dataset (its ``labelsTr``), None where it has none yet."""
    if not (raw / "labelsTr").is_dir():
        return None
    try:
        ending = json.loads((raw / "dataset.json").read_text()).get("file_ending", ".nii.gz")
    except (OSError, ValueError, AttributeError):
        ending = ".nii.gz"
    return sorted(p.name[: -len(ending)] for p in (raw / "labelsTr").glob(f"*{ending}"))


def missing_preprocessed(raw: Path, preprocessed: Path, configuration: str) -> list[str] | None:
    """The training cases of ``raw`` whose preprocessed file of ``configuration`` is not there (nnU-Net writes a
    case's ``.pkl`` last), all of them in a folder whose preprocessing run did not finish; None when the configuration
    is not planned. Without the raw dataset, the configuration's data folder must hold some case (else the list is
    ``["(none)"]``)."""
    plans = read_plans(preprocessed, configuration)
    if plans is None:
        return None
    if (preprocessed / INCOMPLETE_MARKER).exists():  # an nnalign_plan_and_preprocess run that did not finish
        return training_cases(raw) or ["(none)"]
    data = preprocessed / (configuration_value(plans, configuration, "data_identifier")
                           or f"{PLANS_NAME}_{configuration}")
    cases = training_cases(raw)
    if cases is None:
        return [] if any(data.glob("*.pkl")) else ["(none)"]
    return [case for case in cases if not (data / f"{case}.pkl").is_file()]


def check_preprocessing_complete(folder: Path) -> None:
    """One-line NnalignError if the preprocessed dataset ``folder`` was left by an nnalign_plan_and_preprocess run
    that failed or was interrupted (it holds :data:`INCOMPLETE_MARKER`)."""
    if (Path(folder) / INCOMPLETE_MARKER).exists():
        dataset_id = dataset_id_of(Path(folder).name)
        how = f" -d {dataset_id}" if dataset_id is not None else ""
        raise NnalignError(f"{folder}: its preprocessing did not finish (interrupted or failed): run "
                           f"nnalign_plan_and_preprocess{how} again")
