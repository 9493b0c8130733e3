#!/usr/bin/env bash
# The papers' full MNIST protocols on one or more GPUs, unattended and resumable.
#
#   bash benchmarks/gpu_papers.sh     # needs torch.cuda.is_available() and MNIST in $GPU_PAPERS_DATA
#
# Steps (GPU_PAPERS_STEPS, default "grid burda"):
#   grid   The TMC paper's Fig. 5 / Fig. 6 and the reproduction's Table 1 (benchmarks/mnist_grid.py):
#          recognition factorised, small, large x gradient reparam, STL, DReGs x objective TMC, IWAE,
#          3 seeds (54 runs), 1200 epochs, full 60000 / 10000 images, batch 128, K = 20, test bounds every
#          10 epochs and at each of the last 50, Table 1 over the last 50 epochs (1151-1200), as in the
#          reproduction.
#   burda  Burda et al.'s Table 1 (benchmarks/burda_table.py): the 8-stage schedule (3280 epochs),
#          one- and two-layer models, VAE and IWAE at k = 1, 5, 50, TMC at k = 5 and 50 on two layers,
#          NLL = -L_5000 on all 10000 test images.
# Budget: the reproduction measured 11 s (IWAE) and 14 s (TMC) per grid epoch on a GPU, so the grid is
# about 10 GPU-days (STL and DReGs cost more); each Burda run takes 3280 epochs of 3000 steps.
# Every run keeps a checkpoint folder (written after every epoch) and is skipped when complete, so an
# interrupted invocation is continued by running the same command again. With GPU_PAPERS_GPUS=N each
# step runs N processes (--shard i/N, CUDA_VISIBLE_DEVICES=i) and then one more without --shard that
# writes the combined figures, tables and JSON (the grid's with --report: it trains nothing).
# Each process's output goes to <out>/logs/<step>-<i>.log; <out>/gpu_papers.json records the steps,
# their exit status and seconds; the exit status is non-zero if any step failed.
#
# Environment:
#   GPU_PAPERS_DATA      MNIST directory (default $TMCGRAPH_DATA; required unless GPU_PAPERS_QUICK=1)
#   GPU_PAPERS_DEVICE    device (default cuda; the tests use cpu)
#   GPU_PAPERS_GPUS      processes per step, one GPU each (default 1)
#   GPU_PAPERS_OUT       output folder (default benchmarks/results/gpu_papers); run folders under it
#   GPU_PAPERS_STEPS     subset of: grid burda (default both)
#   GPU_PAPERS_SEEDS     seeds per setting (default 3 for the grid, 1 for burda)
#   GPU_PAPERS_EPOCHS    grid epochs (default 1200); GPU_PAPERS_STAGES burda stages (default 8)
#   GPU_PAPERS_PYTHON    interpreter (default python)
#   GPU_PAPERS_QUICK=1   tiny synthetic versions of both steps (what the tests run)
#   GPU_PAPERS_DRY_RUN=1 print the commands instead of running them (no CUDA check)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DEVICE="${GPU_PAPERS_DEVICE:-cuda}"
GPUS="${GPU_PAPERS_GPUS:-1}"
OUT="${GPU_PAPERS_OUT:-$HERE/results/gpu_papers}"
STEPS="${GPU_PAPERS_STEPS:-grid burda}"
PY="${GPU_PAPERS_PYTHON:-python}"
QUICK="${GPU_PAPERS_QUICK:-0}"
DRY="${GPU_PAPERS_DRY_RUN:-0}"
DATA="${GPU_PAPERS_DATA:-${TMCGRAPH_DATA:-}}"

if ! [[ "$GPUS" =~ ^[1-9][0-9]*$ ]]; then
    echo "gpu_papers: GPU_PAPERS_GPUS must be a positive integer, got '$GPUS'" >&2
    exit 2
fi
for step in $STEPS; do
    if [[ "$step" != grid && "$step" != burda ]]; then
        echo "gpu_papers: unknown step '$step' (choose from grid burda)" >&2
        exit 2
    fi
done
if [[ "$QUICK" != 1 && -z "$DATA" ]]; then
    echo "gpu_papers: set GPU_PAPERS_DATA (or TMCGRAPH_DATA) to the folder holding MNIST's four IDX files" >&2
    exit 2
fi
if [[ "$DEVICE" == cuda* && "$DRY" != 1 ]]; then
    if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "gpu_papers: torch.cuda.is_available() is False here; nothing was run" >&2
        exit 2
    fi
    "$PY" -c 'import torch; print("gpu_papers: CUDA devices", torch.cuda.device_count(), torch.cuda.get_device_name(0))'
fi

if [[ "$QUICK" == 1 ]]; then
    data=(--quick)
    grid=(--recognition small --grads reparam --objectives tmc,iwae --seeds "${GPU_PAPERS_SEEDS:-1}"
          --eval-every 1 --last 2 --limit-train 64 --limit-test 32 --batch-size 32)
    grid_epochs=(--epochs 2)
    burda=(--layers 1,2 --objectives vae:1,iwae:3 --objectives-2 iwae:3,tmc:2 --seeds "${GPU_PAPERS_SEEDS:-1}"
           --stages 2 --epochs 2 --limit-train 48 --limit-test 24 --eval-k 30)
else
    data=(--data "$DATA")
    grid=(--recognition factorised,small,large --grads reparam,stl,dregs --objectives tmc,iwae
          --seeds "${GPU_PAPERS_SEEDS:-3}" --eval-every 10 --eval-last 50 --last 50)
    grid_epochs=(--epochs "${GPU_PAPERS_EPOCHS:-1200}")
    burda=(--layers 1,2 --objectives vae:1,vae:5,vae:50,iwae:5,iwae:50
           --objectives-2 vae:1,vae:5,vae:50,iwae:5,iwae:50,tmc:5,tmc:50
           --seeds "${GPU_PAPERS_SEEDS:-1}" --stages "${GPU_PAPERS_STAGES:-8}")
fi
declare -A SCRIPT=([grid]=mnist_grid.py [burda]=burda_table.py)

if [[ "$DRY" != 1 ]]; then
    mkdir -p "$OUT/logs"
fi
status_file="$(mktemp)"
trap 'rm -f "$status_file"' EXIT
start=$SECONDS
failed=0

run() {  # step, label, visible device (or ""), arguments...
    local step="$1" label="$2" visible="$3"
    shift 3
    echo "== gpu_papers: $label: ${visible:+CUDA_VISIBLE_DEVICES=$visible }$PY ${SCRIPT[$step]} $*"
    if [[ "$DRY" == 1 ]]; then
        return 0
    fi
    local t0=$SECONDS rc=0
    if [[ -n "$visible" ]]; then
        CUDA_VISIBLE_DEVICES="$visible" "$PY" "$HERE/${SCRIPT[$step]}" "$@" >"$OUT/logs/$label.log" 2>&1 || rc=$?
    else
        "$PY" "$HERE/${SCRIPT[$step]}" "$@" >"$OUT/logs/$label.log" 2>&1 || rc=$?
    fi
    echo "== gpu_papers: $label exit $rc in $((SECONDS - t0)) s"
    printf '%s\t%s\t%s\t%s\n' "$label" "$rc" "$((SECONDS - t0))" "$*" >>"$status_file"
    if [[ "$rc" != 0 ]]; then
        failed=1
    fi
}

for step in $STEPS; do
    if [[ "$step" == grid ]]; then
        args=("${data[@]}" "${grid[@]}" --device "$DEVICE" --threads 1 --runs "$OUT/mnist_grid_runs" --out "$OUT")
        train=("${args[@]}" "${grid_epochs[@]}")
        combined=("${args[@]}" --report)
    else
        args=("${data[@]}" "${burda[@]}" --device "$DEVICE" --threads 1 --runs "$OUT/burda_runs" --out "$OUT")
        train=("${args[@]}")
        combined=("${args[@]}")
    fi
    if [[ "$GPUS" -gt 1 ]]; then
        pids=()
        for ((i = 0; i < GPUS; i++)); do
            run "$step" "$step-$i" "$i" "${train[@]}" --shard "$i/$GPUS" &
            pids+=($!)
        done
        for pid in "${pids[@]}"; do
            wait "$pid"
        done
        run "$step" "$step-combined" "" "${combined[@]}"
    else
        run "$step" "$step" "" "${train[@]}"
    fi
done

if [[ "$DRY" == 1 ]]; then
    exit 0
fi
"$PY" - "$status_file" "$OUT/gpu_papers.json" "$DEVICE" "$QUICK" "$GPUS" "$((SECONDS - start))" <<'EOF'
import json, sys

status, out, device, quick, gpus, total = sys.argv[1:7]
steps = []
for line in open(status):
    name, rc, dt, args = line.rstrip("\n").split("\t", 3)
    steps.append({"step": name, "exit_status": int(rc), "seconds": int(dt), "arguments": args,
                  "result": "ok" if rc == "0" else "failed"})
with open(out, "w") as f:
    json.dump({"suite": "gpu_papers", "device": device, "quick": quick == "1", "processes_per_step": int(gpus),
               "total_seconds": int(total), "steps": steps}, f, indent=2)
    f.write("\n")
print(f"gpu_papers: wrote {out}")
EOF
if awk -F '\t' '$2 != 0 {bad = 1} END {exit !bad}' "$status_file"; then
    failed=1  # a step failed (also one run in the background by a shard)
fi
echo "gpu_papers: finished in $((SECONDS - start)) s"
exit "$failed"
