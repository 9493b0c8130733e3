#!/usr/bin/env bash
# The performance suite and the timing panels of the paper's Fig. 3 on a GPU, unattended.
#
#   bash benchmarks/gpu_suite.sh            # needs torch.cuda.is_available(); JSON + PNG in benchmarks/results/gpu/
#
# Runs, one process at a time, with --device cuda and modest grids (budget: under 9 minutes):
#   perf_toy     N in {128, 1024} x K in {128, 512}, forward and forward+backward, 5 seeds
#   perf_chain   mixture chain, n in {50, 200} x K in {100, 1000}, 3 seeds; hand-compiled only for n = 50
#                (torch.compile unrolls the n-link loop)
#   perf_hmm     S = 10, T = 100, 5 seeds
#   perf_mnist   TMC vs IWAE step, the three recognition models, 5 seeds; the compiled contenders for
#                "small" only (the outside-share analysis is CPU-only: skipped on CUDA)
#   perf_memory  peak host RSS and CUDA memory of toy (N = 1024, K = 512) and chain (n = 200, K = 1000) for
#                tmcgraph, hand and the streaming loop, each in its own process
#   perf_toy --fig3   Fig. 3 B and D: TMC, SMC, IWAE time vs K at N = 128 and vs N at K = 128, 5 seeds
#   perf_densities    the fused Bernoulli likelihood vs torch's (alone, MNIST steps, L_5000), 15 pairs
# Each step has a time limit (timeout(1)); a step that fails or runs over is recorded and the suite goes
# on. The steps, their exit status and seconds are written to <out>/gpu_suite.json; the exit status is
# non-zero if any step failed.
#
# Environment:
#   GPU_SUITE_DEVICE   device for every step (default cuda; the tests use cpu)
#   GPU_SUITE_QUICK=1  pass --quick and drop the grid and seed options (tiny grids; what the tests run)
#   GPU_SUITE_OUT      output folder (default benchmarks/results/gpu)
#   GPU_SUITE_PYTHON   interpreter (default python)
#   GPU_SUITE_STEPS    space-separated subset of: toy chain hmm mnist memory fig3 densities (default all)
#   GPU_SUITE_DRY_RUN=1  print the commands instead of running them (no CUDA check)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DEVICE="${GPU_SUITE_DEVICE:-cuda}"
QUICK="${GPU_SUITE_QUICK:-0}"
OUT="${GPU_SUITE_OUT:-$HERE/results/gpu}"
PY="${GPU_SUITE_PYTHON:-python}"
STEPS="${GPU_SUITE_STEPS:-toy chain hmm mnist memory fig3 densities}"

DRY="${GPU_SUITE_DRY_RUN:-0}"

if [[ "$DEVICE" == cuda* && "$DRY" != 1 ]]; then
    if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "gpu_suite: torch.cuda.is_available() is False here; nothing was run" >&2
        exit 2
    fi
    "$PY" -c 'import torch; print("gpu_suite: CUDA device", torch.cuda.get_device_name(0), "torch", torch.__version__)'
fi
if [[ "$DRY" != 1 ]]; then
    mkdir -p "$OUT"
fi

common=(--device "$DEVICE" --out "$OUT" --threads 1)
if [[ "$QUICK" == 1 ]]; then
    common+=(--quick)
    toy_grid=(); chain_grid=(); hmm_grid=(); mnist_grid=(); memory_grid=(); fig3_grid=(); densities_grid=()
else
    toy_grid=(--seeds 5 --N 128,1024 --K 128,512)
    chain_grid=(--seeds 3 --n 50,200 --K 100,1000)
    hmm_grid=(--seeds 5 --S 10 --T 100)
    mnist_grid=(--seeds 5 --K 20 --batch 128 --recognition factorised,small,large)
    memory_grid=()
    fig3_grid=(--seeds 5 --fig3-K 1,4,16,64,256,1024 --fig3-N 8,32,128,512,1024,4096)
    densities_grid=(--reps 15)
fi

# Options that are not grids: used in quick runs too, so the tests exercise them.
toy_opts=(--compile-backend inductor)  # the default on full runs; in quick runs it also turns on tmcgraph-compiled
chain_opts=(--max-compile-n 50)
hmm_opts=()
mnist_opts=(--compile-recognition small)
memory_opts=(--workloads toy,chain --contenders tmcgraph,hand,hand-streaming --timeout 40)
fig3_opts=(--fig3)

# step name, time limit (s), script, options...
declare -A LIMIT=([toy]=80 [chain]=80 [hmm]=45 [mnist]=120 [memory]=75 [fig3]=45 [densities]=40)  # 485 s in all
declare -A SCRIPT=([toy]=perf_toy.py [chain]=perf_chain.py [hmm]=perf_hmm.py [mnist]=perf_mnist.py
                   [memory]=perf_memory.py [fig3]=perf_toy.py [densities]=perf_densities.py)

status_file="$(mktemp)"
trap 'rm -f "$status_file"' EXIT
start=$SECONDS
failed=0

run_step() {
    local name="$1"
    shift
    local limit="${LIMIT[$name]}"
    if [[ "$QUICK" == 1 ]]; then
        limit=600  # CPU quick runs: generous (the tests keep their own time)
    fi
    local t0=$SECONDS rc=0
    echo "== gpu_suite: $name (limit ${limit} s): $PY ${SCRIPT[$name]} $*"
    if [[ "$DRY" == 1 ]]; then
        return 0
    fi
    if command -v timeout >/dev/null 2>&1; then
        timeout --kill-after=10 "$limit" "$PY" "$HERE/${SCRIPT[$name]}" "$@" || rc=$?
    else
        "$PY" "$HERE/${SCRIPT[$name]}" "$@" || rc=$?
    fi
    local dt=$((SECONDS - t0))
    echo "== gpu_suite: $name exit $rc in ${dt} s (total $((SECONDS - start)) s)"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$dt" "$*" >>"$status_file"
    if [[ "$rc" != 0 ]]; then
        failed=1
    fi
}

for step in $STEPS; do
    case "$step" in
        toy) run_step toy "${common[@]}" ${toy_grid[@]+"${toy_grid[@]}"} ${toy_opts[@]+"${toy_opts[@]}"} ;;
        chain) run_step chain "${common[@]}" ${chain_grid[@]+"${chain_grid[@]}"} "${chain_opts[@]}" ;;
        hmm) run_step hmm "${common[@]}" ${hmm_grid[@]+"${hmm_grid[@]}"} ${hmm_opts[@]+"${hmm_opts[@]}"} ;;
        mnist) run_step mnist "${common[@]}" ${mnist_grid[@]+"${mnist_grid[@]}"} "${mnist_opts[@]}" ;;
        memory) run_step memory "${common[@]}" ${memory_grid[@]+"${memory_grid[@]}"} "${memory_opts[@]}" ;;
        fig3) run_step fig3 "${common[@]}" ${fig3_grid[@]+"${fig3_grid[@]}"} "${fig3_opts[@]}" ;;
        densities) run_step densities "${common[@]}" ${densities_grid[@]+"${densities_grid[@]}"} ;;
        *) echo "gpu_suite: unknown step '$step' (choose from toy chain hmm mnist memory fig3 densities)" >&2
           exit 2 ;;
    esac
done

if [[ "$DRY" == 1 ]]; then
    exit 0
fi
"$PY" - "$status_file" "$OUT/gpu_suite.json" "$DEVICE" "$QUICK" "$((SECONDS - start))" <<'EOF'
import json, sys

status, out, device, quick, total = sys.argv[1:6]
steps = []
for line in open(status):
    name, rc, dt, args = line.rstrip("\n").split("\t", 3)
    rc = int(rc)
    steps.append({"step": name, "exit_status": rc, "seconds": int(dt), "arguments": args,
                  "result": "ok" if rc == 0 else ("timed out" if rc in (124, 137) else "failed")})
with open(out, "w") as f:
    json.dump({"suite": "gpu_suite", "device": device, "quick": quick == "1", "total_seconds": int(total),
               "steps": steps}, f, indent=2)
    f.write("\n")
print(f"gpu_suite: wrote {out}")
EOF
echo "gpu_suite: finished in $((SECONDS - start)) s"
exit "$failed"
