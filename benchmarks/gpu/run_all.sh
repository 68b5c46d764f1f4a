#!/usr/bin/env bash
# Issue 14 on a GPU, in one command (under 8 minutes on one H200 with 16 cores): the overhead
# benchmark (plain vs raceguard vs CUDA Sanitizer, as ratios), the CPU proxy of the tracker's own
# per-op cost (and how it scales with live device blocks), and the stress acceptance (the device fixtures found within 100 schedules and
# replayed 3/3, the fork server never initialising CUDA) through tests/test_stress_cuda.py.
#
#   bash benchmarks/gpu/run_all.sh              # everything; exit 0 when every phase passed
#   RUN_ALL_QUICK=1 bash benchmarks/gpu/run_all.sh   # small workloads: a dry run on a CPU machine
#
# Output: one block per phase on stdout; logs and JSON in $OUT or benchmarks/results/gpu-run-all/.
set -uo pipefail
cd "$(dirname "$0")/../.."
results="${OUT:-benchmarks/results/gpu-run-all}"
mkdir -p "$results"
quick=()
[ "${RUN_ALL_QUICK:-0}" = "1" ] && quick=(--quick)
failed=0
phase() {
    local name="$1"; shift
    local started=$SECONDS
    echo "== $name: $*"
    "$@" 2>&1 | tee "$results/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: rc=$rc, $((SECONDS - started)) s"
    [ "$rc" -ne 0 ] && failed=1
}
phase overhead python benchmarks/gpu/run_gpu.py --rounds 2 ${quick[@]+"${quick[@]}"} --json "$results/overhead.json"
phase proxy python benchmarks/gpu/proxy.py --runs 1 --json "$results/proxy.json"
phase live_blocks python benchmarks/gpu/live_blocks.py --runs 1 --json "$results/live_blocks.json"
phase stress python -m pytest -q -p no:cacheprovider -n "${RUN_ALL_WORKERS:-4}" tests/test_stress_cuda.py \
    --junitxml="$results/stress.xml"
echo "run-all: $([ $failed -eq 0 ] && echo PASSED || echo FAILED) (logs in $results)"
exit $failed
