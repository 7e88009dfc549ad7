"""The default P* chosen on held-out data: the paper's P* (``--anchor mixture``, the default) against nnalign's scaled
P* (``--anchor mixture-scaled``: weights that scale the latents into the predictor, logit gain and weight floor) and
the Original teacher (plain nnU-Net), each trained the same way on the same cases.

It works in a Table I folder (``benchmarks/table_one.py --work WORK``, the same data options) and shares its teachers:
per seed, each step skipped when its result exists (an interrupted series resumes),

1. Table I's steps 1 and 2 (``table_one.prepare_seed``): the seed's data, the demo's P* teacher (with its run-1
   students of the first of Table I's modalities) and the Original teacher;
2. the scaled P* teacher with the P* teacher's modality dropout, subset sampling and length;
3. each teacher predicts the held-out cases from all four modalities and from each of Table I's student modalities
   alone (absent ones filled by its anchor; zeroed for the Original teacher), scored as the demo scores them.

Every score is a row of ``WORK/anchor_ablation.csv``; the table gives per teacher and input the mean held-out Dice (the
mean of WT, TC and ET) over the seeds, then the paper's P* minus each other teacher within each seed with a 95%
interval from their spread over the seeds::

    python benchmarks/anchor_ablation.py --work table_one --seeds 1 2 3 --teacher-epochs 60 --student-epochs 30
    python benchmarks/anchor_ablation.py --work table_real --seeds 1 2 \\
        --data ../shared/data/brats/BraTS2018 --teacher-epochs 15 --student-epochs 8 --iters-per-epoch 20
    python benchmarks/anchor_ablation.py --work table_one --table-only
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent))
from incomplete_data import score_teacher, summary  # noqa: E402
from kd_repeats import _read_rows  # noqa: E402
from table_one import (ORIGINAL, P_STAR, _train, prepare_seed, series_options, series_parser,  # noqa: E402
                       teacher_command, teachers)

if TYPE_CHECKING:
    from nnalign.demo import DemoOptions
    from nnalign.runs import AnyTeacher

SCALED = "mixture-scaled"
LABELS = {P_STAR: "P* (paper)", SCALED: "P* scaled (nnalign)", ORIGINAL: "Original"}
"""The teachers by anchor, as ``anchor_ablation.csv`` and the table name them; the first is the reference."""


def ablation_teachers() -> dict[str, AnyTeacher]:
    """Table I's two teachers and the scaled P* trained as the P* teacher is (its dropout and subset sampling; the
    scaled anchor's own alignment weight)."""
    from nnalign.runs import TeacherSpec

    table = teachers()
    p_star = table[P_STAR]
    scaled = TeacherSpec(SCALED, modality_dropout=p_star.modality_dropout, subset_sampling=p_star.subset_sampling)
    return {P_STAR: p_star, SCALED: scaled, ORIGINAL: table[ORIGINAL]}


def run_seed(work: Path, seed: int, methods: tuple[str, ...], modalities: tuple[str, ...], scores_csv: Path,
             demo: DemoOptions) -> None:
    """Train what the seed lacks and score every teacher on every input not yet in ``scores_csv``."""
    from nnalign.demo import demo_preset
    from nnalign.model_folders import model_folder

    inputs = ("all", *modalities)
    done = {(int(r["seed"]), r["teacher"], r["modalities"]) for r in _read_rows(scores_csv)}
    if all((seed, label, given) in done for label in LABELS.values() for given in inputs):
        return
    env, results = prepare_seed(work, seed, methods, modalities[0], demo)
    configuration = demo_preset().configuration
    raw = Path(env["nnUNet_raw"]) / results.name
    seed_dir = work / f"seed{seed}"
    for anchor, teacher in ablation_teachers().items():
        folder = model_folder(results, teacher.trainer_name(), configuration)
        _train(f"seed {seed}: the {LABELS[anchor]} teacher", folder, teacher_command(results.name, teacher, demo), env,
               results / "table_one_logs" / f"train_{anchor}.log")
        score_teacher(seed, LABELS[anchor], folder, raw, inputs, done, seed_dir / "anchor_ablation", env, demo.device,
                      scores_csv)


def main() -> None:
    p = series_parser(__doc__.split("\n\n")[0],
                      "a Table I folder (table_one.py --work): its runs, and anchor_ablation.csv (resumable)")
    args = p.parse_args()
    work, methods, modalities, demo = series_options(args)
    scores_csv = work / "anchor_ablation.csv"
    if not args.table_only:
        for seed in args.seeds:
            run_seed(work, seed, methods, modalities, scores_csv, demo)
    print(summary(_read_rows(scores_csv), tuple(LABELS.values()), ("all", *modalities)))


if __name__ == "__main__":
    main()
