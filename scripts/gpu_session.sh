#!/usr/bin/env bash
# One GPU session, one command: every test, every benchmark (--benchmark-json), the compile report,
# the user-facing commands on CUDA and the benchmark report, written together to <root>/<device>-<date>/:
#
#   scripts/gpu_session.sh              # -> bench/results/nvidia-h100-80gb-hbm3-2026-01-02/
#   scripts/gpu_session.sh "$OUT"       # on a borrowed machine: -> $OUT/<device>-<date>/, to copy back
#
# Files: env.txt (date, commit, device, python/torch/CUDA/triton versions, nvidia-smi), tests.log,
# bench.log + bench.json, compile_report.txt + .md, train_{torch,fused}.log and
# generate_{torch,fused}.log (the cli step: scripts/train.py, PyTorch and --fused, gpt2-124M bf16, then
# scripts/generate.py --cuda-graph on the model it trained), report.md + *.png
# (scripts/bench_report.py), and summary.txt (each step's exit status). A failing step does not stop the later ones; the script
# exits non-zero if any step failed. Commit the folder under bench/results/ (see its README.md).
#
# Environment: STEPS (default "tests bench compile cli report": run a subset, e.g. STEPS="bench report";
# with a per-command time limit run them in parts, see bench/results/README.md),
# BENCH_ARGS (extra pytest arguments for the bench step, e.g. BENCH_ARGS="-k attention"),
# PYTHON (default python), ALLOW_CPU=1 (run without a GPU, to try the script; the result folder is
# then named cpu-<date> and holds CPU numbers).
set -uo pipefail
cd "$(dirname "$0")/.."

root="${1:-bench/results}"
PY="${PYTHON:-python}"
STEPS="${STEPS:-tests bench compile cli report}"
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"

for s in $STEPS; do
  case "$s" in
    tests|bench|compile|cli|report) ;;
    *) echo "gpu_session: unknown step '$s' in STEPS (steps: tests bench compile cli report)" >&2; exit 2 ;;
  esac
done

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  if [ "${ALLOW_CPU:-0}" != "1" ]; then
    echo "gpu_session: torch sees no CUDA device. This script records GPU results; on a CPU run" \
         "'python -m pytest bench/ --benchmark-only' (or set ALLOW_CPU=1 to try the script)." >&2
    exit 2
  fi
fi

device=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')")
# "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3": safe in a path on every system.
slug=$(printf '%s' "$device" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+//; s/-+$//')
day=$(date -u +%Y-%m-%d)
dir="$root/$slug-$day"
n=2
while [ -e "$dir" ]; do  # a second session the same day gets its own folder, never overwrites
  dir="$root/$slug-$day-$n"
  n=$((n + 1))
done
mkdir -p "$dir" || exit 2
dir=$(cd "$dir" && pwd)
echo "gpu_session: writing to $dir"

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "device: $device"
  commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
  git diff --quiet HEAD 2>/dev/null || commit="$commit (plus uncommitted changes)"
  echo "commit: $commit"
  "$PY" - <<'EOF'
import platform
import torch
print(f"python: {platform.python_version()}")
print(f"torch: {torch.__version__}")
print(f"cuda (torch built with): {torch.version.cuda}")
try:
    import triton
    print(f"triton: {triton.__version__}")
except ImportError:
    print("triton: not installed")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"compute capability: {p.major}.{p.minor}, SMs: {p.multi_processor_count}, "
          f"memory: {p.total_memory / 2**30:.1f} GiB")
EOF
  echo
  if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi; else echo "nvidia-smi: not found"; fi
} > "$dir/env.txt" 2>&1

: > "$dir/summary.txt"
failed=0
step() {  # step NAME LOG COMMAND...: run, log, record the exit status
  local name=$1 log=$2
  shift 2
  echo "== $name: $*"
  local t0=$SECONDS
  "$@" > "$dir/$log" 2>&1
  local rc=$?
  echo "$name: exit $rc ($((SECONDS - t0)) s) -> $log" | tee -a "$dir/summary.txt"
  tail -n 3 "$dir/$log"
  [ "$rc" -eq 0 ] || failed=1
}

for s in $STEPS; do
  case "$s" in
    tests)
      step tests tests.log "$PY" -m pytest tests/ -q ;;
    bench)
      # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
      step bench bench.log "$PY" -m pytest bench/ --benchmark-only --benchmark-json "$dir/bench.json" ${BENCH_ARGS:-} ;;
    compile)
      if [ -f scripts/compile_report.py ]; then
        step compile compile_report.txt "$PY" scripts/compile_report.py \
          --markdown "$dir/compile_report.md" --workers "$(nproc 2>/dev/null || echo 2)"
      else
        echo "compile: scripts/compile_report.py not found, skipped" | tee -a "$dir/summary.txt"
      fi ;;
    cli)
      # The commands users type, on CUDA: 100 training steps of gpt2-124M in bf16 on the built-in
      # corpus (tokens/s and the losses in the log), PyTorch then the kernels, and 200 generated
      # tokens from each trained model through a CUDA-graph decode step (tokens/s at the end).
      runs=$(mktemp -d)
      for impl in torch fused; do
        flag=$([ "$impl" = fused ] && echo --fused)
        # shellcheck disable=SC2086  # $flag is empty or one argument
        step "train-$impl" "train_$impl.log" "$PY" scripts/train.py --model gpt2-124M $flag --dropout 0 \
          --dtype bfloat16 --steps 100 --batch-size 8 --eval-every 50 --no-progress --out "$runs/$impl"
        # shellcheck disable=SC2086
        step "generate-$impl" "generate_$impl.log" "$PY" scripts/generate.py --checkpoint "$runs/$impl" $flag \
          --cuda-graph --dtype bfloat16 --max-new-tokens 200 --ignore-eos --prompt "Every effort moves you"
      done
      rm -rf "$runs" ;;
    report)
      if [ -f "$dir/bench.json" ]; then
        step report bench_report.log "$PY" scripts/bench_report.py "$dir/bench.json" --out "$dir"
      else
        echo "report: no bench.json (the bench step did not run or wrote nothing), skipped" | tee -a "$dir/summary.txt"
        failed=1
      fi ;;
  esac
done

echo "gpu_session: done, results in $dir"
exit "$failed"
