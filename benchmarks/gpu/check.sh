#!/usr/bin/env bash
# The one GPU check (issue 12): everything that only a real GPU can show, in one command, under
# 8 minutes on one GPU with 16 cores. Run from anywhere, in an environment where raceguard is
# installed with its test extra (pip install -e ".[test]"), on a machine with CUDA:
#
#   bash benchmarks/gpu/check.sh            # prints one summary line per phase and a total
#   bash benchmarks/gpu/check.sh faults     # only the named phases
#   GPU_CHECK_ALLOW_CPU=1 bash benchmarks/gpu/check.sh faults   # try the script on a CPU machine
#
# Phases (each a pytest run; their JUnit files go to $OUT or benchmarks/results/gpu-check/):
#   real-cuda   tests/test_cuda_real.py: every fixture under fixtures/cuda through raceguard check
#   default     tests/test_cuda_on_cpu.py: every CPU race/clean fixture with its tensors on cuda
#               and every thread on the default stream (tests/data/on_default_device.py), plus
#               the same through the CUDA-on-CPU backend
#   programs    tests/test_programs.py: ordinary GPU programs (scalar arithmetic, AMP +
#               GradScaler, fused/foreach optimizers, SDPA, DataLoader with pin_memory, threaded
#               fp16 inference, a transformers BERT) unchanged under raceguard, zero findings
#   faults      tests/test_fault_injection.py: every hook family made to raise
#   suite       the whole test suite (tests that assume a CPU-only build skip themselves)
# Exit code: 0 when every phase passed, 1 otherwise, 2 without a CUDA device (nothing to check).
set -uo pipefail
cd "$(dirname "$0")/../.."
results="${OUT:-benchmarks/results/gpu-check}"
mkdir -p "$results"
workers="${GPU_CHECK_WORKERS:-8}"

python - <<'PY' || exit 2
import sys, torch
print(f"gpu-check: torch {torch.__version__}, Python {sys.version.split()[0]}, CUDA available: {torch.cuda.is_available()}")
import os
if not torch.cuda.is_available():
    if os.environ.get("GPU_CHECK_ALLOW_CPU") == "1":
        print("gpu-check: no CUDA device; running on the CPU as asked (a dry run of this script)")
        sys.exit(0)
    print("gpu-check: no CUDA device: nothing to check here (the CPU suite covers the rest)")
    sys.exit(1)
print(f"gpu-check: device {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}")
PY
phases=("$@")
[ ${#phases[@]} -eq 0 ] && phases=(real-cuda default programs faults suite)

declare -A status
run_phase() {
    local name="$1"; shift
    [[ " ${phases[*]} " == *" $name "* ]] || return 0
    local started=$SECONDS
    python -m pytest -q -p no:cacheprovider -n "$workers" --junitxml="$results/$name.xml" "$@" \
        >"$results/$name.log" 2>&1
    local rc=$?
    status[$name]=$rc
    echo "gpu-check: $name: $(tail -n 1 "$results/$name.log") (rc=$rc, $((SECONDS - started)) s)"
}

run_phase real-cuda tests/test_cuda_real.py
run_phase default tests/test_cuda_on_cpu.py
run_phase programs tests/test_programs.py
run_phase faults tests/test_fault_injection.py
run_phase suite tests

failed=0
for name in "${phases[@]}"; do
    [ "${status[$name]:-1}" -ne 0 ] && failed=1
done
echo "gpu-check: $([ $failed -eq 0 ] && echo PASSED || echo FAILED) (logs and JUnit files in $results)"
exit $failed
