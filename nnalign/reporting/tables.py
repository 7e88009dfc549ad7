"""The paper's tables from a :class:`~nnalign.reporting.collect.Results`, as Markdown and CSV.

Dice is given in percent, HD95 in mm, both as means over cases. A cell without a run (or without metrics) is empty:
``–`` in Markdown, an empty field in CSV. Markdown shows two decimals; CSV keeps four, so a CSV value rounded to two
decimals is the Markdown cell.

- Table III: the 15 modality subsets x WT/TC/ET/average Dice of the student distilled with one KD method from the
  ``none``-anchor teacher (without alignment) and from the ``mixture`` teacher (with alignment), and a mean row.
- Table I: single-modality students, KD method x teacher anchor (``original``, the plain nnU-Net teacher, first),
  average Dice, the gain over the ``none`` anchor, and P* over ``original`` (the paper's improvement).
- Table IV: the teachers (all modalities) by anchor, Dice and HD95, and nnU-Net with modality dropout when trained.
- Tables I and IV compare teachers that differ only in the anchor: the teacher settings most anchors share, with a
  note naming them, and a note wherever a cell had to use a teacher that differs in another setting too.
- Table V: single-modality models without distillation (``kd none``), each evaluated on every modality.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from typing import Sequence

from nnalign.data.labels import REGION_NAMES
from nnalign.evaluation.validation import Metrics
from nnalign.modalities import BRATS_MODALITIES, all_subsets, subset_tag
from nnalign.losses.kd.registry import KD_METHODS
from nnalign.reporting.collect import FULL_SUBSET, STANDARD_ANCHORS, Results, Run, anchor_order_key
from nnalign.runs import BASELINE

EMPTY = "–"
TEXT, PCT, DELTA, MM, INT, MARK = "text", "pct", "delta", "mm", "int", "mark"


@dataclass
class Table:
    """A table: ``columns`` with a kind each (text, pct, delta, mm, int, mark), ``rows`` of cells (None = empty)."""

    key: str
    title: str
    columns: list[str]
    kinds: list[str]
    rows: list[list] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)  # "row / column" -> model folder used

    def column(self, name: str) -> list:
        i = self.columns.index(name)
        return [row[i] for row in self.rows]

    def row(self, label: str) -> list:
        return next(r for r in self.rows if r[0] == label)

    def markdown(self) -> str:
        align = {TEXT: ":---", MARK: ":---:"}
        lines = ["| " + " | ".join(self.columns) + " |",
                 "|" + "|".join(align.get(k, "---:") for k in self.kinds) + "|"]
        for row in self.rows:
            lines.append("| " + " | ".join(_md_cell(v, k) for v, k in zip(row, self.kinds)) + " |")
        return "\n".join(lines)

    def markdown_with_notes(self) -> str:
        text = f"**Table {self.key}.** {self.title}\n\n{self.markdown()}\n"
        if self.notes:
            text += "\n" + "\n".join(f"- {n}" for n in self.notes) + "\n"
        return text

    def csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(self.columns)
        for row in self.rows:
            writer.writerow([_csv_cell(v, k) for v, k in zip(row, self.kinds)])
        return buf.getvalue()


def _learns_weights(anchor: str | None) -> bool:
    """Whether a teacher of this anchor spec learns mixture weights (the anchor registry's fact)."""
    from nnalign.networks.anchor_registry import ANCHOR_KINDS

    kind = ANCHOR_KINDS.get((anchor or "").partition(":")[0])
    return kind is not None and kind.learns_weights


def _md_cell(value, kind: str) -> str:
    if value is None:
        return EMPTY if kind != MARK else ""
    if kind == MARK:
        return "●" if value else "○"
    if kind == DELTA:
        return f"{value:+.2f}"
    if kind in (PCT, MM):
        return f"{value:.2f}"
    return str(value)


def _csv_cell(value, kind: str) -> str:
    if value is None:
        return ""
    if kind == MARK:
        return "1" if value else "0"
    if kind in (PCT, DELTA, MM):
        return f"{value:.4f}"
    return str(value)


def _pct(m: Metrics | None) -> list[float | None]:
    """WT, TC, ET and average Dice in percent (four Nones without metrics)."""
    if m is None:
        return [None] * (len(REGION_NAMES) + 1)
    return [100.0 * m.dice[r] for r in REGION_NAMES] + [100.0 * m.dice_avg]


def _mm(m: Metrics | None) -> list[float | None]:
    if m is None or m.hd95 is None:
        return [None] * (len(REGION_NAMES) + 1)
    return [m.hd95[r] for r in REGION_NAMES] + [m.hd95_avg]


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def subset_label(subset: Sequence[str]) -> str:
    return subset_tag(subset, BRATS_MODALITIES)


# ----------------------------------------------------------------------------------------------------------------------


def table_iii(res: Results, kd: str | None) -> Table:
    """The 15 subsets x Dice without (``none`` teacher) and with (``mixture`` teacher) alignment, for ``kd``."""
    regions = [*REGION_NAMES, "Avg"]
    columns = ["Subset", *BRATS_MODALITIES, *(f"w/o {r}" for r in regions), *(f"w/ {r}" for r in regions), "Δ Avg"]
    kinds = [TEXT, *[MARK] * len(BRATS_MODALITIES), *[PCT] * (2 * len(regions)), DELTA]
    table = Table("III", f"Dice (%) of the students of every modality subset, distilled with {kd or '(no KD method)'} "
                         f"from the teacher without alignment (anchor none) and with alignment (anchor mixture, P*).",
                  columns, kinds)
    teacher_rows = []
    for subset in all_subsets(BRATS_MODALITIES):
        label = subset_label(subset)
        sides = []
        for anchor, side in (("none", "w/o"), ("mixture", "w/")):
            run = res.student(subset, kd, anchor) if kd else None
            if run is None and set(subset) == set(FULL_SUBSET):
                run = res.teacher(anchor)
                if run is not None:
                    teacher_rows.append(side)
            if run is not None:
                table.sources[f"{label} / {side}"] = run.name
            sides.append(_pct(res.metrics(run)))
        table.rows.append([label, *(m in subset for m in BRATS_MODALITIES), *sides[0], *sides[1],
                           _sub(sides[1][-1], sides[0][-1])])
    n = len(table.rows)
    numeric = [[row[i] for row in table.rows] for i in range(1 + len(BRATS_MODALITIES), len(columns))]
    table.rows.append(["Mean", *[None] * len(BRATS_MODALITIES), *(_mean(col) for col in numeric)])
    counts = {side: sum(v is not None for v in table.column(f"{side} Avg")[:n]) for side in ("w/o", "w/")}
    if any(c < n for c in counts.values()):
        table.notes.append(f"The mean row averages the subsets present: {counts['w/o']} of {n} without alignment, "
                           f"{counts['w/']} of {n} with alignment; Δ Avg is averaged over the "
                           f"{sum(v is not None for v in table.column('Δ Avg')[:n])} subsets that have both.")
    if teacher_rows:
        table.notes.append(f"Row {subset_label(FULL_SUBSET)}: no full-modality student, so the teacher itself is shown "
                           f"({' and '.join(teacher_rows)}).")
    if kd == "none":
        table.notes.append("KD method none does not use the teacher: the two sides differ only by run.")
    return table


def _anchor_columns(res: Results) -> list[str]:
    found = {r.anchor for r in res.runs if r.anchor and r.anchor != BASELINE}
    return sorted(set(STANDARD_ANCHORS) | found, key=anchor_order_key)


def _settings(variant: str) -> str:
    return "the default settings" if not variant else f"the settings {variant}"


def table_i(res: Results) -> Table:
    """Single-modality students: KD method x teacher anchor, average Dice (%), each anchor's gain over none, and the
    paper's improvement, P* over the plain nnU-Net teacher ("Original Method")."""
    anchors = [BASELINE, *_anchor_columns(res)]
    columns, kinds = ["Student", "KD"], [TEXT, TEXT]
    for a in anchors:
        columns.append(a)
        kinds.append(PCT)
        if a not in ("none", BASELINE):
            columns.append(f"Δ {a}")
            kinds.append(DELTA)
    columns.append("P* − original")
    kinds.append(DELTA)
    table = Table("I", "Average Dice (%) of the single-modality students per KD method and teacher anchor "
                       "(original: the plain nnU-Net teacher, the paper's Original Method); Δ is the gain over the "
                       "teacher without alignment (anchor none), P* − original the paper's improvement.",
                  columns, kinds)
    singles = [r for r in res.students if len(r.subset) == 1]
    variant = res.compared_variant(singles)
    kds = list(KD_METHODS)
    fallback, other_settings = False, set()
    for modality in BRATS_MODALITIES:
        for kd in kds:
            row: list = [modality, kd]
            values: dict[str, float | None] = {}
            for a in anchors:
                run = res.student((modality,), kd, a, variant)
                if run is None and kd != "none" and (run := res.student((modality,), kd, a)) is not None:
                    other_settings.add(run.name)
                if run is not None:
                    table.sources[f"{modality} {kd} / {a}"] = run.name
                    fallback |= kd == "none" and run.anchor != a
                m = res.metrics(run)
                values[a] = None if m is None else 100.0 * m.dice_avg
                row.append(values[a])
                if a not in ("none", BASELINE):
                    row.append(_sub(values[a], values["none"]))
            row.append(_sub(values.get("mixture"), values[BASELINE]))
            table.rows.append(row)
    table.notes.append(f"Students of teachers with {_settings(variant)} besides the anchor (each anchor's default "
                       f"λ), so that the columns differ only in the anchor.")
    if other_settings:
        table.notes.append("No student of a teacher with those settings for some cells; shown instead, from a teacher "
                           f"that differs in another setting too: {', '.join(sorted(other_settings))}.")
    if fallback:
        table.notes.append("KD none does not use the teacher; where no kd-none run names a teacher with the column's "
                           "anchor, the subset's other kd-none run is shown.")
    return table


def table_iv(res: Results) -> Table:
    """The teachers by anchor (all modalities): Dice (%) and HD95 (mm) per region and averaged; teachers with the
    same settings besides the anchor, and nnU-Net trained with modality dropout (sparsified) where there is one."""
    regions = [*REGION_NAMES, "Avg"]
    columns = ["Anchor", *(f"Dice {r}" for r in regions), *(f"HD95 {r}" for r in regions), "Cases"]
    kinds = [TEXT, *[PCT] * len(regions), *[MM] * len(regions), INT]
    table = Table("IV", "The teachers with every modality by anchor: Dice (%) and HD95 (mm).", columns, kinds)
    variant = res.compared_variant(res.teachers)
    table.notes.append(f"Teachers with {_settings(variant)} besides the anchor (each anchor's default λ).")
    anchors = sorted(set(STANDARD_ANCHORS) | {r.anchor for r in res.teachers}, key=anchor_order_key)
    rows: list[tuple[str, Run | None]] = []
    for anchor in anchors:
        run = res.teacher(anchor, variant)
        label = "original (nnU-Net)" if anchor == BASELINE else anchor
        if run is None and (run := res.teacher(anchor)) is not None:
            table.notes.append(f"{label}: no teacher with {_settings(variant)}; shown instead {run.name}, which "
                               f"differs in another setting than the anchor: not a like-for-like comparison.")
        rows.append((label, run))
    for r in res.teachers:
        dropout = r.teacher.modality_dropout if r.teacher.is_original else 0
        if dropout and all(r is not run for _, run in rows):
            rows.append((f"original, modality dropout {dropout:g} (sparsified nnU-Net)", r))
    for label, run in rows:
        m = res.metrics(run)
        if run is not None:
            table.sources[label] = run.name
        table.rows.append([label, *_pct(m), *_mm(m), None if m is None else m.num_cases])
        if run is not None and m is None:
            table.notes.append(f"{label}: {run.name} has no validation predictions or evaluation yet.")
        if m is not None and m.hd95 is None:
            table.notes.append(f"{label}: no ground truth found, Dice from nnU-Net's summary.json, no HD95.")
        weights = res.mixture_weights(run) if run is not None and _learns_weights(run.anchor) else None
        if weights:
            table.notes.append("Learned mixture weights (normalised): "
                               + ", ".join(f"{k} {v:.3f}" for k, v in weights.items()) + ".")
    variants = [r.name for r in res.teachers if r.name not in table.sources.values()]
    if variants:
        table.notes.append(f"Other teacher runs not shown: {', '.join(variants)}.")
    return table


def table_v(res: Results) -> Table:
    """Single-modality models without distillation (rows: trained on) evaluated on every modality (columns)."""
    columns = ["Trained on", *(f"on {m}" for m in BRATS_MODALITIES)]
    table = Table("V", "Average Dice (%) of the single-modality models (students with KD none), each evaluated on "
                       "every modality.", columns, [TEXT, *[PCT] * len(BRATS_MODALITIES)])
    off_diagonal = False
    for trained in BRATS_MODALITIES:
        run: Run | None = res.student((trained,), "none", None)
        row: list = [trained]
        for evaluated in BRATS_MODALITIES:
            m = res.metrics(run, (evaluated,)) if run is not None else None
            off_diagonal |= m is not None and evaluated != trained
            row.append(None if m is None else 100.0 * m.dice_avg)
        if run is not None:
            table.sources[trained] = run.name
        table.rows.append(row)
    if not off_diagonal:
        table.notes.append("Only the diagonal: evaluating a model on another modality needs "
                           "nnalign_evaluations/<model>/<modality>/metrics.json.")
    return table


def runs_table(res: Results) -> Table:
    """Every run reported, with what it is and its own-subset metrics (for the report's appendix)."""
    columns = ["Model", "Role", "Subset", "KD", "Anchor", "Folds", "Trained on", "Cases", "Dice Avg", "Source"]
    table = Table("runs", "Every model found.", columns, [TEXT, TEXT, TEXT, TEXT, TEXT, TEXT, TEXT, INT, PCT, TEXT],
                  notes=["Trained on: per fold, the training cases a student used of those of its fold (the others "
                         "lack a modality of its subset)."])
    for r in sorted(res.runs, key=lambda r: (r.role != "teacher", anchor_order_key(r.anchor), r.kd or "", r.name)):
        m = res.metrics(r)
        table.rows.append([r.name, r.role, subset_label(r.subset), r.kd or "", r.anchor or "?",
                           ",".join(r.folds) or "–", res.training_cases(r) if r.role == "student" else "",
                           None if m is None else m.num_cases, None if m is None else 100.0 * m.dice_avg,
                           "" if m is None else m.source])
    return table
