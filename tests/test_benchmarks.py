"""The step benchmarks run end to end (on a tiny patch) and print every variant's row and the verdict line."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize("script, rows", [
    ("teacher_step.py", ["stock nnU-Net", "teacher none", "teacher normal", "teacher modality:T1ce", "teacher mixture",
                         "teacher mixture, 2-conv latent encoder", "teacher mixture, latents at stage 2"]),
    ("student_step.py", ["stock nnU-Net (4 modalities)", "student, no distillation", "student + kdnet",
                         "student + pmkl", "student + protokd", "student + smunet", "frozen teacher forward alone"]),
])
def test_step_benchmark_runs(script, rows, tmp_path):
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), "--config", "3d_cpu", "--patch", "16", "16", "16",
                             "--steps", "1", "--warmup", "0"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    table = [line.split("|")[1].strip() for line in result.stdout.splitlines() if line.startswith("| ")]
    assert table[1:] == rows  # the header, then one row per variant in order
    assert "target <=" in result.stdout.splitlines()[-1]
