"""``nnalign_predict --backend openvino``: each fold's network run by OpenVINO inside nnU-Net's own predictor.

nnU-Net's ``nnUNetPredictor`` is used unchanged (sliding window, Gaussian weighting, mirroring, fold ensembling,
resampling); only its ``network`` is replaced by :class:`OpenVINONetwork`, which nnU-Net calls like the torch module
it was: ``load_state_dict`` with a fold's weights, then one patch-sized tile (batch 1) per call.

Each (fold, teacher's present channels) is converted once with OpenVINO's PyTorch frontend at the model's patch size,
in float32, and cached as OpenVINO IR (``.xml`` graph, ``.bin`` weights: data, no code) in ``fold_N/openvino/``, or,
when the model folder cannot be written, in the user's cache folder (``$XDG_CACHE_HOME/nnalign/openvino``), or else
kept in memory; each fallback is a one-line note. A cache is used only when its sidecar JSON holds exactly this
model's :class:`CacheKey` and the sha256 of both IR files; anything else is converted again and rewritten.
OpenVINO is imported only here, and only when the backend is used.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from nnalign.errors import NnalignError
from nnalign.training.record import INPUTS_FILE, SETTINGS_RECORD

PRECISION = "f32"
"""OpenVINO's inference precision. Set explicitly: its CPU plugin would otherwise pick bf16 where the CPU has it."""
MIN_VOXEL_AGREEMENT = 0.999
MAX_DICE_DIFFERENCE = 0.001
"""What the OpenVINO backend's label maps must keep of the torch backend's, per case (:func:`label_agreement`)."""
CACHE_FOLDER = "openvino"
"""The cache folder inside each fold folder."""
CONFIG_FILES = ("plans.json", "dataset.json")
FOLD_CONFIG_FILES = (SETTINGS_RECORD, INPUTS_FILE)
"""Files of the model folder and of each fold that nnU-Net and nnalign build the network from; hashed into the key."""


def openvino_version() -> str:
    """The installed OpenVINO's version; NnalignError (one line) if it is not installed."""
    try:
        import openvino
    except ImportError:
        raise NnalignError("--backend openvino: OpenVINO is not installed; it is an optional extra: "
                           "pip install nnalign[openvino]") from None
    return openvino.get_version().split("-")[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files_sha256(paths: Sequence[Path]) -> str:
    """One sha256 over the names and contents of those of ``paths`` that exist."""
    digest = hashlib.sha256()
    for path in paths:
        if path.is_file():
            digest.update(f"{path.name}\0{_sha256(path)}\0".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class CacheKey:
    """Everything a converted network depends on; a cache whose sidecar differs in any field is not used."""

    checkpoint_sha256: str
    config_sha256: str  # CONFIG_FILES and the fold's FOLD_CONFIG_FILES
    trainer: str
    configuration: str
    patch_size: tuple[int, ...]
    input_channels: int
    present: tuple[int, ...] | None  # a teacher's real channels (they shape its graph); None for other networks
    openvino: str
    precision: str
    method_version: int
    nnalign: str

    def file_stem(self, checkpoint: str) -> str:
        """``checkpoint_final-<sha256[:16]>-ov<version>-<present>-<digest of every field>``."""
        present = "all" if self.present is None else "c" + "".join(map(str, self.present))
        digest = hashlib.sha256(json.dumps(self.as_json(), sort_keys=True).encode()).hexdigest()[:12]
        return f"{Path(checkpoint).stem}-{self.checkpoint_sha256[:16]}-ov{self.openvino}-{present}-{digest}"

    def as_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def user_cache_folder() -> Path:
    """``$XDG_CACHE_HOME/nnalign/openvino`` (``~/.cache`` when unset): where caches go when a model folder is
    read-only."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nnalign" / CACHE_FOLDER


def label_agreement(a, b, reference=None, convention: str = "nnunet") -> tuple[float, dict[str, float]]:
    """How far two label maps of one case (``convention``) agree: the fraction of equal voxels, and per region
    (WT, TC, ET) the Dice difference, ``|Dice(a, reference) - Dice(b, reference)|`` with a reference, else
    ``1 - Dice(a, b)`` (which bounds it from above as long as the two differ in few voxels). The backends must
    agree to :data:`MIN_VOXEL_AGREEMENT` and :data:`MAX_DICE_DIFFERENCE`."""
    import numpy as np

    from nnalign.data.labels import region_masks
    from nnalign.evaluation.metrics import dice

    regions_a, regions_b = region_masks(a, convention), region_masks(b, convention)
    if reference is None:
        differences = {r: 1.0 - dice(regions_a[r], regions_b[r]) for r in regions_a}
    else:
        regions_ref = region_masks(reference, convention)
        differences = {r: abs(dice(regions_a[r], regions_ref[r]) - dice(regions_b[r], regions_ref[r]))
                       for r in regions_a}
    return float(np.mean(np.asarray(a) == np.asarray(b))), differences


# ----------------------------------------------------------------------------------------------------------------------
# the IR cache


def read_cached(folder: Path, stem: str, key: CacheKey):
    """The cached ``ov.Model`` of ``key`` in ``folder``, or None if there is none or it is stale, foreign, incomplete
    or unreadable. Reading IR parses XML and weights only; no code in it runs."""
    import openvino as ov

    xml, weights, sidecar = (folder / f"{stem}{ending}" for ending in (".xml", ".bin", ".json"))
    try:
        record = json.loads(sidecar.read_text())
        if (not isinstance(record, dict) or record.get("key") != key.as_json()
                or record.get("xml_sha256") != _sha256(xml) or record.get("bin_sha256") != _sha256(weights)):
            return None
        return ov.Core().read_model(str(xml), str(weights))
    except (OSError, ValueError, RuntimeError):  # missing, not JSON, or IR that OpenVINO cannot parse
        return None


def write_cache(folder: Path, stem: str, key: CacheKey, model) -> None:
    """Save ``model`` as IR in ``folder`` under ``stem``: each file under a temporary name, then renamed, the sidecar
    last, so that a reader never takes a half-written cache. OSError if the folder cannot be written."""
    import openvino as ov

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{stem}.{os.getpid()}.tmp"
    tmp_xml, tmp_bin, tmp_json = (tmp.with_name(tmp.name + ending) for ending in (".xml", ".bin", ".json"))
    try:
        ov.save_model(model, str(tmp_xml), compress_to_fp16=False)
        record = {"key": key.as_json(), "xml_sha256": _sha256(tmp_xml), "bin_sha256": _sha256(tmp_bin)}
        tmp_json.write_text(json.dumps(record, indent=2) + "\n")
        for source, ending in ((tmp_bin, ".bin"), (tmp_xml, ".xml"), (tmp_json, ".json")):
            os.replace(source, folder / f"{stem}{ending}")
    except BaseException:
        for path in (tmp_xml, tmp_bin, tmp_json):
            with contextlib.suppress(OSError):
                path.unlink()
        raise


class _Traceable(torch.nn.Module):
    """The network's forward with a teacher's presence mask as a constant input (``present``), as OpenVINO's
    frontend traces it; other networks are called with the tile alone."""

    def __init__(self, network: torch.nn.Module, present: tuple[int, ...] | None, channels: int) -> None:
        super().__init__()
        self.network = network
        mask = None
        if present is not None:
            mask = torch.zeros(1, channels, dtype=torch.bool)
            mask[0, list(present)] = True
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x) if self.mask is None else self.network(x, present=self.mask)


def convert(network: torch.nn.Module, present: tuple[int, ...] | None, shape: tuple[int, ...]):
    """``network`` (with its current weights, in eval mode) as an ``ov.Model`` for float32 input of ``shape``."""
    import openvino as ov

    example = torch.zeros(shape)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python control flow, which is fixed per tile shape
        return ov.convert_model(_Traceable(network, present, shape[1]).eval(), example_input=example)


def cached_or_converted(folders: Sequence[Path], stem: str, key: CacheKey, make: Callable[[], object],
                        note: Callable[[str], None]):
    """The model of ``key`` from the first of ``folders`` that holds a valid cache, else ``make()`` saved into the
    first folder that can be written (a note for each that cannot), else kept in memory (a note)."""
    for folder in folders:
        model = read_cached(folder, stem, key)
        if model is not None:
            return model
    model = make()
    for folder in folders:
        try:
            write_cache(folder, stem, key, model)
            return model
        except OSError as e:
            note(f"cannot write the OpenVINO cache in {folder} ({e.strerror or e})"
                 + ("; trying the next folder" if folder != folders[-1] else "; the converted network is kept in "
                                                                              "memory for this run"))
    return model


# ----------------------------------------------------------------------------------------------------------------------
# the stand-in for nnU-Net's network


class OpenVINONetwork(torch.nn.Module):
    """What nnU-Net's predictor calls in place of the torch network: per fold (chosen by ``load_state_dict`` with
    one of ``fold_weights``) and teacher subset (``present_modalities``, forwarded to the torch network), an OpenVINO
    model compiled for ``threads`` CPU threads (torch's at the first tile: nnU-Net's setting during prediction).

    ``forward`` takes a (1, C, *patch) float32 tile and returns the logits (1, K, *patch) as a new torch tensor.
    """

    def __init__(self, network: torch.nn.Module, fold_weights: Sequence[dict], keys: Sequence[CacheKey],
                 caches: Sequence[Sequence[Path]], checkpoint: str, note: Callable[[str], None]) -> None:
        super().__init__()
        self.network = network.eval()
        self._fold_weights = list(fold_weights)
        self._keys = list(keys)  # per fold, with present None; the subset is filled in per call
        self._caches = [list(c) for c in caches]
        self._checkpoint = checkpoint
        self._note = note
        self._fold = 0
        self._requests: dict[tuple[int, tuple[int, ...] | None], object] = {}

    @property
    def present_modalities(self) -> tuple[int, ...]:
        """The torch network's (a teacher's); AttributeError for networks without it, as for the torch network."""
        return self.network.present_modalities

    @present_modalities.setter
    def present_modalities(self, value: tuple[int, ...]) -> None:
        self.network.present_modalities = value

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Make the fold whose weights ``state_dict`` is (one of ``fold_weights``, by identity) the active one."""
        found = [i for i, weights in enumerate(self._fold_weights) if weights is state_dict]
        if not found:
            raise ValueError("OpenVINONetwork serves the folds it was made with only")
        self._fold = found[0]
        return self.network.load_state_dict(state_dict, strict=strict, assign=assign)

    def _present(self) -> tuple[int, ...] | None:
        present = getattr(self.network, "present_modalities", None)
        return None if present is None else tuple(sorted(present))

    def _request(self, shape: tuple[int, ...]):
        import openvino as ov

        present = self._present()
        cached = self._requests.get((self._fold, present))
        if cached is not None:
            return cached
        key = dataclasses.replace(self._keys[self._fold], present=present)
        if tuple(shape[2:]) != key.patch_size or shape[:2] != (1, key.input_channels):
            raise ValueError(f"OpenVINONetwork takes tiles of (1, {key.input_channels}, "
                             f"{', '.join(map(str, key.patch_size))}), not {tuple(shape)}")
        model = cached_or_converted(self._caches[self._fold], key.file_stem(self._checkpoint), key,
                                    lambda: convert(self.network, present, shape), self._note)
        config = {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "INFERENCE_PRECISION_HINT": key.precision,
                  "PERFORMANCE_HINT": "LATENCY"}
        request = ov.Core().compile_model(model, "CPU", config).create_infer_request()
        self._requests[(self._fold, present)] = request
        return request

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        request = self._request(tuple(x.shape))
        output = request.infer([x.detach().contiguous().numpy()])[0]  # a copy, not the request's buffer
        return torch.from_numpy(output)


def openvino_network(predictor, model, note: Callable[[str], None]) -> OpenVINONetwork:
    """An :class:`OpenVINONetwork` for ``predictor`` (initialised from ``model``, an inference ``Model``), its
    caches in each fold folder, then :func:`user_cache_folder`."""
    from nnalign import __version__
    from nnalign.model_folders import fold_folder
    from nnalign.training.record import METHOD_VERSION

    version = openvino_version()
    keys, caches = [], []
    patch = tuple(int(s) for s in predictor.configuration_manager.patch_size)
    channels = len(model.modalities)
    for fold in model.folds:
        fold_dir = fold_folder(model.folder, fold)
        config = [model.folder / name for name in CONFIG_FILES] + [fold_dir / name for name in FOLD_CONFIG_FILES]
        keys.append(CacheKey(checkpoint_sha256=_sha256(fold_dir / model.checkpoint),
                             config_sha256=_files_sha256(config), trainer=model.trainer,
                             configuration=model.configuration, patch_size=patch, input_channels=channels,
                             present=None, openvino=version, precision=PRECISION, method_version=METHOD_VERSION,
                             nnalign=__version__))
        caches.append([fold_dir / CACHE_FOLDER, user_cache_folder()])
    return OpenVINONetwork(predictor.network, predictor.list_of_parameters, keys, caches, model.checkpoint, note)
