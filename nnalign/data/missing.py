"""Which cases of a raw dataset lack which modalities: the record conversion writes into dataset.json and every later
stage reads.

The record is ``dataset.json["nnalign"]["missing_modalities"]``, ``{case: [modality, ...]}``, naming only the cases
that lack something (absent: the dataset is complete). An absent modality has no file: nothing is invented in the
raw dataset. nnU-Net copies dataset.json beside the preprocessed data, so trainers read the same record there.
"""
from __future__ import annotations

from typing import Sequence

from nnalign.errors import NnalignError
from nnalign.modalities import modalities_from_dataset_json

MISSING_KEY = "missing_modalities"


def missing_modalities(dataset_json: dict, source: str = "dataset.json") -> dict[str, tuple[str, ...]]:
    """``{case: absent modalities in channel order}`` of a dataset.json ({} for a complete dataset); a one-line
    NnalignError starting with ``source`` for a record that is not such a map, names a modality the dataset does
    not have, or leaves a case no modality."""
    record = (dataset_json.get("nnalign") or {}).get(MISSING_KEY) or {}
    modalities = modalities_from_dataset_json(dataset_json, source)
    if not isinstance(record, dict):
        raise NnalignError(f"{source}: nnalign.{MISSING_KEY} must map case IDs to lists of modalities")
    result = {}
    for case, names in record.items():
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise NnalignError(f"{source}: nnalign.{MISSING_KEY}: {case}: expected a list of modality names")
        unknown = [n for n in names if n not in modalities]
        if unknown:
            raise NnalignError(f"{source}: nnalign.{MISSING_KEY}: {case}: {unknown[0]} is not one of the dataset's "
                               f"modalities ({', '.join(modalities)})")
        absent = tuple(m for m in modalities if m in names)
        if len(absent) == len(modalities):
            raise NnalignError(f"{source}: nnalign.{MISSING_KEY}: {case} lacks every modality")
        if absent:
            result[str(case)] = absent
    return result


def present_channels(dataset_json: dict, case: str) -> tuple[int, ...]:
    """The channel indices of the modalities ``case`` has, in channel order."""
    modalities = modalities_from_dataset_json(dataset_json)
    absent = missing_modalities(dataset_json).get(case, ())
    return tuple(c for c, m in enumerate(modalities) if m not in absent)


def presence_by_case(dataset_json: dict, cases: Sequence[str]) -> dict[str, tuple[bool, ...]]:
    """``{case: one bool per channel, True where the case has that modality}`` for ``cases``."""
    modalities = modalities_from_dataset_json(dataset_json)
    record = missing_modalities(dataset_json)
    return {c: tuple(m not in record.get(c, ()) for m in modalities) for c in cases}
