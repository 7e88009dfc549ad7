"""One sliding-window tile through stock nnU-Net's network and the teacher in torch, and the teacher in OpenVINO:
the network's share of prediction without process start, preprocessing, resampling or export.

    python benchmarks/predict_tile.py --config 3d_fullres
    python benchmarks/predict_tile.py --config 3d_cpu --threads 2

The networks are built from nnalign's plans for a BraTS 2018-sized dataset (the step benchmarks' plans) with untrained
weights, in evaluation mode; each tile is (1, 4, *patch), every modality present, as nnU-Net's predictor runs it
(torch: ``inference_mode``, the default memory layout; OpenVINO: the backend's own conversion and settings, f32,
``LATENCY``). Prints each one's median time per tile after one untimed call, its ratio to stock nnU-Net's, and the
largest difference of the OpenVINO logits from torch's. ``--int8 N`` adds the teacher in OpenVINO int8: NNCF's
post-training quantization (``quantize_int8``, needs ``nncf``) calibrated on N random tiles, which measures the speed
only (an untrained network's logits have no margin to keep; ``benchmarks/int8_agreement.py`` checks a trained one's
labels). ``benchmarks/predict.py`` measures whole cases.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import brats_like_plans  # noqa: E402
from teacher_step import build  # noqa: E402

ALL_PRESENT = (0, 1, 2, 3)
INT8_SETTINGS = "NNCF mixed preset, full bias correction"
"""How :func:`quantize_int8` quantizes, as the benchmarks print it."""


def median_seconds(call, repeats: int) -> tuple[float, object]:
    """Median wall time of ``call()`` over ``repeats`` calls after one untimed call, and the last result."""
    result = call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def quantize_int8(model, tiles: list):
    """``model`` (an ``ov.Model``) quantized to int8 by NNCF's post-training quantization calibrated on ``tiles``
    (:data:`INT8_SETTINGS`); exits with one line if NNCF is not installed."""
    try:
        import nncf
    except ImportError:
        sys.exit(f"{Path(sys.argv[0]).name}: int8 needs NNCF: pip install nncf")
    return nncf.quantize(model, nncf.Dataset(tiles), subset_size=len(tiles), preset=nncf.QuantizationPreset.MIXED,
                         fast_bias_correction=False)


def main() -> None:
    import openvino as ov

    from nnalign.inference.openvino_backend import convert

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="3d_fullres", choices=("3d_cpu", "3d_fullres"))
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="CPU threads for torch and OpenVINO (default: torch's, %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed tiles of each (default: %(default)s)")
    p.add_argument("--int8", type=int, metavar="N", default=0,
                   help="also the teacher in OpenVINO int8, calibrated on N random tiles (needs nncf)")
    p.add_argument("--patch", type=int, nargs=3, metavar=("D", "H", "W"),
                   help="replace the plan's patch size (a quick check that the script runs)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with brats_like_plans() as plans:
        cfg = plans["configurations"][args.config]
        arch = cfg["architecture"]
        patch = tuple(args.patch or cfg["patch_size"])
        torch.manual_seed(0)
        stock = build("stock", arch, arch["_kw_requires_import"], False).eval()
        teacher = build("mixture", arch, arch["_kw_requires_import"], False).eval()
    x = torch.randn(1, 4, *patch)
    print(f"plan {args.config}: tile {tuple(x.shape)}, {args.threads} threads, OpenVINO {ov.__version__}")
    rows = {}
    with torch.inference_mode():
        rows["stock nnU-Net, torch"] = median_seconds(lambda: stock(x), args.repeats)
        rows["teacher, torch"] = median_seconds(lambda: teacher(x), args.repeats)
    start = time.perf_counter()
    model = convert(teacher, ALL_PRESENT, tuple(x.shape))
    converted = time.perf_counter() - start
    start = time.perf_counter()
    request = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": args.threads,
                                                      "INFERENCE_PRECISION_HINT": "f32",
                                                      "PERFORMANCE_HINT": "LATENCY"}).create_infer_request()
    compiled = time.perf_counter() - start
    rows["teacher, OpenVINO"] = median_seconds(lambda: request.infer([x.numpy()])[0], args.repeats)
    if args.int8:
        start = time.perf_counter()
        quantized = ov.Core().compile_model(
            quantize_int8(model, [torch.randn(x.shape).numpy() for _ in range(args.int8)]), "CPU",
            {"INFERENCE_NUM_THREADS": args.threads, "PERFORMANCE_HINT": "LATENCY"}).create_infer_request()
        print(f"int8 quantization {time.perf_counter() - start:.1f} s ({args.int8} calibration tiles; {INT8_SETTINGS})")
        rows["teacher, OpenVINO int8"] = median_seconds(lambda: quantized.infer([x.numpy()])[0], args.repeats)
    print(f"OpenVINO conversion {converted:.1f} s (once per model, then cached), compilation {compiled:.1f} s "
          f"(once per process)\n\n| network | time per tile (s) | vs stock nnU-Net, torch |\n|---|---|---|")
    stock_s = rows["stock nnU-Net, torch"][0]
    for name, (seconds, _) in rows.items():
        print(f"| {name} | {seconds:.3f} | {seconds / stock_s:.2f} |")
    difference = float(abs(torch.from_numpy(rows["teacher, OpenVINO"][1]) - rows["teacher, torch"][1]).max())
    print(f"\nlargest difference of OpenVINO's logits from torch's: {difference:.1e}")


if __name__ == "__main__":
    main()
