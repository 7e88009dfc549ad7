#!/usr/bin/env bash
# The checks that need a CUDA GPU, which CI (CPU only) cannot run, in one command:
#   1. tests   the CUDA cases of the distillation-loss and N(0,1)-latent tests (float32 and float16 on the GPU);
#   2. steps   teacher and student training steps on 3d_fullres with AMP against stock nnU-Net
#              (targets in documentation/benchmarks.md: teacher <= 1.25x, every distillation method <= 1.4x);
#   3. demo    the README's demo end to end with -device cuda (nnU-Net's AMP and torch.compile), every distillation
#              method beside the no-distillation student, shortened (20 teacher and 10 student epochs) so that the
#              whole script stays within a 10-minute command (six networks to compile).
#
#   bash benchmarks/gpu_check.sh OUT_DIR [cuda|cpu]
#
# Writes OUT_DIR/gpu_check.log (every command's output) and OUT_DIR/summary.txt (one line per check, with its time),
# and exits non-zero when a check failed. 'cpu' runs the same checks at a tiny size: a check of this script.
# nnalign, nnunetv2 and their dependencies must be importable by 'python3' (e.g. 'pip install -e .').
set -uo pipefail

out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [cuda|cpu]}
device=${2:-cuda}
case $device in
    cuda) config=3d_fullres; steps=(--steps 8 --amp); demo=(--teacher-epochs 20 --student-epochs 10) ;;
    cpu) config=3d_cpu; steps=(--steps 1 --warmup 0 --patch 16 16 16)
         demo=(--teacher-epochs 1 --student-epochs 1 --iters-per-epoch 2 --cases 4 --test-cases 1) ;;
    *) echo "gpu_check.sh: device must be cuda or cpu, not '$device'" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
mkdir -p "$out"
log=$out/gpu_check.log summary=$out/summary.txt
: >"$log"; : >"$summary"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=0

check() {  # check NAME COMMAND...: run COMMAND, its output to the log, one line to the summary
    local name=$1 start=$SECONDS status=ok
    shift
    echo "===== $name: $*" >>"$log"
    "$@" >>"$log" 2>&1 || { status=FAILED; failed=1; }
    echo "$name: $status in $((SECONDS - start)) s" | tee -a "$summary"
}

python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee -a "$summary"
check tests python3 -m pytest -q -p no:cacheprovider tests/test_kd_losses.py tests/test_normal_latents.py
check teacher_step python3 benchmarks/teacher_step.py --config "$config" --device "$device" "${steps[@]}"
check student_step python3 benchmarks/student_step.py --config "$config" --device "$device" "${steps[@]}"
check demo env nnUNet_raw="$work/raw" nnUNet_preprocessed="$work/preprocessed" nnUNet_results="$work/results" \
    python3 -m nnalign.cli.demo --kd kdnet,pmkl,protokd,smunet -device "$device" "${demo[@]}"
grep -h "^|\|(target" "$log" >>"$summary" || true  # the benchmarks' and the demo's tables, the targets met or not
exit $failed
