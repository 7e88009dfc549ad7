"""Would int8 keep the OpenVINO backend's agreement? A trained model's held-out cases predicted by ``nnalign_predict
--backend openvino`` in float32 and with the backend's conversion followed by NNCF's post-training int8 quantization,
calibrated on tiles of the model's own preprocessed training cases; per case the voxel agreement and, against the
reference, the Dice difference per region, beside the backend's bounds (99.9 %, 0.001).

    python benchmarks/int8_agreement.py --results DIR --preprocessed DIR --raw DIR --trainer NAME --work DIR

``--results``, ``--preprocessed`` and ``--raw`` are one dataset's folders (e.g. a Table I seed's), ``--trainer`` a
model trained there in the demo's configuration. Needs ``nncf``. ``benchmarks/predict_tile.py --int8`` gives the
speed.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from predict_tile import INT8_SETTINGS, quantize_int8  # noqa: E402


def calibration_tiles(preprocessed: Path, shape: tuple[int, ...], present: tuple[int, ...] | None,
                      channels: list[int] | None = None, per_case: int = 2, seed: int = 0) -> list[np.ndarray]:
    """``per_case`` random tiles of ``shape`` (1, C, *patch) from each preprocessed training case (zero-padded where
    the case is smaller): the case's ``channels`` (a student's modalities; None: all), those outside ``present`` (a
    teacher's) zeroed as the predictor passes them."""
    import blosc2

    rng = random.Random(seed)
    tiles = []
    for path in sorted(p for p in preprocessed.glob("*.b2nd") if not p.name.endswith("_seg.b2nd")):
        data = blosc2.open(str(path))[:]
        data = data if channels is None else data[channels]
        for _ in range(per_case):
            starts = [rng.randint(0, max(0, s - p)) for s, p in zip(data.shape[1:], shape[2:])]
            crop = data[(slice(None), *(slice(a, a + p) for a, p in zip(starts, shape[2:])))]
            tile = np.zeros(shape, np.float32)
            tile[(0, slice(None), *(slice(0, s) for s in crop.shape[1:]))] = crop
            if present is not None:
                tile[0, [c for c in range(shape[1]) if c not in present]] = 0
            tiles.append(tile)
    return tiles


def main() -> None:
    import SimpleITK as sitk

    import nnalign.inference.openvino_backend as backend
    from nnalign.demo import demo_preset
    from nnalign.inference.predict import predict
    from nnalign.modalities import modalities_from_dataset_json, parse_modalities

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in ("results", "preprocessed", "raw", "work"):
        p.add_argument(f"--{name}", type=Path, required=True)
    p.add_argument("--trainer", required=True)
    p.add_argument("--modalities", help="the modalities given, comma-separated (a student's; default: all)")
    args = p.parse_args()
    subset = parse_modalities(args.modalities) if args.modalities else None
    dataset = modalities_from_dataset_json(json.loads((args.raw / "dataset.json").read_text()))
    channels = None if subset is None else [dataset.index(m) for m in subset]
    configuration = demo_preset().configuration
    model = args.work / "model" / f"{args.trainer}__nnAlignPlans__{configuration}"
    shutil.rmtree(args.work, ignore_errors=True)
    shutil.copytree(args.results / model.name, model,
                    ignore=shutil.ignore_patterns(backend.CACHE_FOLDER, "validation", "checkpoint_best.pth"))
    tiles_folder = args.preprocessed / f"nnAlignPlans_{configuration}"
    float32 = backend.convert

    def int8(network, present, shape):
        tiles = calibration_tiles(tiles_folder, shape, present, channels)
        return quantize_int8(float32(network, present, shape), tiles)

    outputs = {}
    for precision, convert in (("f32", float32), ("int8", int8)):
        shutil.rmtree(model / "fold_0" / backend.CACHE_FOLDER, ignore_errors=True)
        backend.convert = convert
        outputs[precision] = args.work / precision
        predict(args.raw / "imagesTs", outputs[precision], model, folds=[0], device="cpu", disable_tta=True,
                modalities=subset, labels="nnunet", progress=False, backend="openvino", on_note=lambda _: None,
                on_error=lambda message: sys.exit(f"int8_agreement.py: {message}"))
    backend.convert = float32
    print(f"{args.trainer}: OpenVINO int8 ({INT8_SETTINGS}) against float32, held-out cases of {args.raw.name}\n\n"
          "| case | voxels equal | Dice difference WT / TC / ET | within 99.9 % / 0.001 |\n|---|---|---|---|")
    for path in sorted(outputs["f32"].glob("*.nii.gz")):
        a, b, ref = (sitk.GetArrayFromImage(sitk.ReadImage(str(f))) for f in
                     (path, outputs["int8"] / path.name, args.raw / "labelsTs" / path.name))
        equal, differences = backend.label_agreement(a, b, ref)
        within = equal >= backend.MIN_VOXEL_AGREEMENT and max(differences.values()) <= backend.MAX_DICE_DIFFERENCE
        print(f"| {path.name} | {100 * equal:.3f} % | " + " / ".join(f"{d:.4f}" for d in differences.values())
              + f" | {'yes' if within else 'no'} |")


if __name__ == "__main__":
    main()
