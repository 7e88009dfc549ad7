"""Where the teacher's training step spends the time it adds over stock nnU-Net's: torch.profiler, operator by operator.

    python benchmarks/profile_step.py --config 3d_fullres --device cuda --amp [--anchor mixture] [--top 20]
    python benchmarks/profile_step.py --config 3d_cpu --device cpu

Profiles ``--steps`` training steps of stock nnU-Net's network and of the teacher with ``--anchor`` (the same plan,
patch and step as ``teacher_step.py``) after ``--warmup`` untimed ones, and prints the operators whose self time per
step (on the GPU for CUDA, else on the CPU) differs most between the two, largest extra time first, with each
network's total. The step-time ratio itself is ``teacher_step.py``'s job: profiling adds overhead.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import benchmark_configuration, benchmark_device, brats_like_plans, step_benchmark_parser  # noqa: E402
from teacher_step import variant_step  # noqa: E402


def self_time_per_step(step, device: torch.device, warmup: int, steps: int) -> dict[str, float]:
    """Milliseconds of self time per step for each operator (device time on CUDA, CPU time otherwise)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    attribute = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    times: dict[str, float] = {}
    for event in prof.key_averages():
        value = getattr(event, attribute, 0.0)
        if value:
            times[event.key] = times.get(event.key, 0.0) + value / 1000 / steps
    return times


def extra_time_table(stock: dict[str, float], teacher: dict[str, float], top: int) -> str:
    """Markdown table of the ``top`` operators with the largest |teacher - stock| self time, and both totals."""
    names = sorted(set(stock) | set(teacher), key=lambda k: abs(teacher.get(k, 0.0) - stock.get(k, 0.0)), reverse=True)
    lines = ["| operator | stock (ms/step) | teacher (ms/step) | extra (ms/step) |", "|---|---|---|---|"]
    for name in names[:top]:
        s, t = stock.get(name, 0.0), teacher.get(name, 0.0)
        lines.append(f"| {name[:70]} | {s:.2f} | {t:.2f} | {t - s:+.2f} |")
    s, t = sum(stock.values()), sum(teacher.values())
    lines.append(f"| **all operators** | {s:.2f} | {t:.2f} | {t - s:+.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = step_benchmark_parser(__doc__)
    p.add_argument("--anchor", default="mixture", help="the teacher's anchor (default: %(default)s)")
    p.add_argument("--top", type=int, default=20, help="operators to list (default: %(default)s)")
    p.add_argument("--align-weight", type=float, default=0.1)
    args = p.parse_args()
    device = benchmark_device(args)
    with brats_like_plans() as plans:
        cfg = benchmark_configuration(plans, args)
        print(f"plan {args.config}: patch {cfg['patch_size']}, batch {cfg['batch_size']}, device {device}"
              f"{', AMP' if args.amp else ''}{', compiled' if args.compile else ''}, teacher anchor {args.anchor}")
        times = {variant: self_time_per_step(variant_step(variant, cfg, device, args), device, args.warmup, args.steps)
                 for variant in ("stock", args.anchor)}
    kind = "GPU" if device.type == "cuda" else "CPU"
    print(f"\nself {kind} time per step, {args.steps} profiled steps, largest differences first:\n")
    print(extra_time_table(times["stock"], times[args.anchor], args.top))


if __name__ == "__main__":
    main()
