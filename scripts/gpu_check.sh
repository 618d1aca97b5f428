#!/usr/bin/env bash
# The device check: everything spp does on a GPU, in one prepared run of at most 8 minutes on one H200, every
# result as JSON in $OUT (default ./gpu-check-out; at most 8 files, as the device tool brings back).
#
#   bash scripts/gpu_check.sh                # on the GPU machine (python3 there holds torch 2.11, transformers 5.17)
#   bash scripts/gpu_check.sh --cpu-smoke    # here and in the test suite: the same steps at tiny sizes, < 60 s
#
# Steps, each under its own time limit inside the 8-minute deadline (a step that fails or runs out of time is
# recorded and the next one runs):
#   install     pip install spp --no-deps over the image's packages (and the wheels in .whl/, if carried;
#               scripts/gpu_wheels.sh downloads them): GPU mode only
#   cuda-tests  pytest -m cuda tests/cuda                                      -> cuda_tests.json
#   model       a LLaMA-7B-shaped random model with 2 blocks (scripts/make_shape_model.py)
#   run         spp run recipes/gpu-check.yaml: Wanda 2:4 and SparseGPT 50% on 128 x 2048 windows, SPP and
#               masked LoRA 20 steps in bf16 and fp16, merged, token perplexity  -> run.json
#   verify      spp verify of every tuned model against its parent              -> verify.json
#   bench-7b    spp bench --shape llama-7b                                      -> bench-7b.json
#   bench-70b   spp bench --shape llama-70b                                     -> bench-70b.json
# and summary.json (every step's exit code and seconds, the GPU) plus log.txt (everything printed).
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
if [[ "${1:-}" == "--cpu-smoke" ]]; then
    MODE=cpu-smoke
elif [[ $# -gt 0 ]]; then
    echo "usage: bash scripts/gpu_check.sh [--cpu-smoke]" >&2
    exit 2
fi
PY=${PYTHON:-python3}
OUT=${OUT:-./gpu-check-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/spp-gpu-check.XXXXXX")
LOG="$OUT/log.txt"
STEPS="$WORK/steps.tsv"
: > "$LOG"
: > "$STEPS"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
STARTED=$(date +%s)

if [[ $MODE == gpu ]]; then
    DEADLINE=$((STARTED + 470))  # 8 minutes less a margin for the summary
    SHAPE=llama-7b BIG_SHAPE=llama-70b
    RUN_SIZES=()
    BENCH_7B=(--shape llama-7b --blocks 2 --nsamples 128 --seqlen 2048 --batch 1 --steps 3)
    # 70B: fewer calibration windows (a block's Hessians are 28672^2), the same sequence length
    BENCH_70B=(--shape llama-70b --blocks 2 --nsamples 32 --seqlen 2048 --batch 1 --steps 2)
    LIMITS=(180 60 200 40 90 100)  # cuda-tests model run verify bench-7b bench-70b
else
    DEADLINE=$((STARTED + 300))
    SHAPE=tiny BIG_SHAPE=tiny
    RUN_SIZES=(stages.wanda-2of4.nsamples=2 stages.wanda-2of4.seqlen=32 stages.sparsegpt-50.nsamples=2
               stages.sparsegpt-50.seqlen=32 stages.eval.seqlen=32 stages.eval.limit=2)
    for stage in spp-bf16 spp-fp16 masked-lora-bf16 masked-lora-fp16; do  # a CPU trains in float32 only
        RUN_SIZES+=("stages.$stage.max_steps=2" "stages.$stage.seqlen=32" "stages.$stage.batch_size=2"
                    "stages.$stage.micro_batch_size=2" "stages.$stage.dtype=float32")
    done
    BENCH_7B=(--shape tiny --blocks 2 --nsamples 2 --seqlen 16 --steps 1 --methods spp)
    BENCH_70B=(--shape tiny --blocks 1 --nsamples 2 --seqlen 16 --steps 1 --methods masked-lora
               --sections prune,recovery,semi-structured)
    LIMITS=(120 60 200 60 120 120)
fi

# step NAME LIMIT STDOUT_FILE COMMAND...: run COMMAND under min(LIMIT, time left), its stdout to STDOUT_FILE (or the
# log when empty), its stderr to the log; record NAME, exit code and seconds
step() {
    local name=$1 limit=$2 stdout=$3
    shift 3
    local left=$((DEADLINE - $(date +%s)))
    ((left < limit)) && limit=$left
    if ((limit < 5)); then
        printf '%s\tskipped\t0\tno time left before the deadline\n' "$name" >> "$STEPS"
        echo "== $name: skipped, no time left" >> "$LOG"
        return
    fi
    echo "== $name (limit ${limit} s): $*" >> "$LOG"
    local start code
    start=$(date +%s.%N)
    if [[ -n $stdout ]]; then
        timeout -k 10 "$limit" "$@" > "$stdout" 2>> "$LOG"
    else
        timeout -k 10 "$limit" "$@" >> "$LOG" 2>&1
    fi
    code=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$code" "$(echo "$(date +%s.%N) - $start" | bc)" "$*" >> "$STEPS"
    echo "== $name: exit $code" >> "$LOG"
}

if [[ $MODE == gpu ]]; then
    nvidia-smi >> "$LOG" 2>&1
    install() {
        if compgen -G ".whl/*.whl" > /dev/null; then
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
                .whl/*.whl || return 1
        fi
        "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir .
    }
    step install 120 "" install
    [[ -d /tmp/site ]] && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

step cuda-tests "${LIMITS[0]}" "" "$PY" -m pytest -m cuda tests/cuda -q -rs -p no:cacheprovider \
    --junitxml="$WORK/cuda-junit.xml"
"$PY" - "$WORK/cuda-junit.xml" "$OUT/cuda_tests.json" <<'PYTHON'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

source, out = Path(sys.argv[1]), Path(sys.argv[2])
report = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "tests": []}
if source.is_file():
    for case in ET.parse(source).getroot().iter("testcase"):
        outcome, message = "passed", None
        for tag, name in (("failure", "failed"), ("error", "errors"), ("skipped", "skipped")):
            found = case.find(tag)
            if found is not None:
                outcome, message = name, (found.get("message") or found.text or "")[:400]
                break
        report[outcome] += 1
        report["tests"].append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                                "seconds": float(case.get("time") or 0), "message": message})
else:
    report["note"] = "pytest wrote no report (see log.txt)"
out.write_text(json.dumps(report, indent=2) + "\n")
PYTHON

MODEL_DIR="$WORK/$SHAPE-2"
MODEL_DTYPE=bfloat16
[[ $MODE == cpu-smoke ]] && MODEL_DTYPE=float32
step model "${LIMITS[1]}" "" "$PY" scripts/make_shape_model.py --shape "$SHAPE" --blocks 2 --dtype "$MODEL_DTYPE" \
    --out "$MODEL_DIR"
step run "${LIMITS[2]}" "$OUT/run.json" "$PY" -m spp_cli run recipes/gpu-check.yaml "model=$MODEL_DIR" \
    "output_dir=$WORK/run" "${RUN_SIZES[@]}" --format json
step verify "${LIMITS[3]}" "$OUT/verify.json" "$PY" - "$WORK/run" <<'PYTHON'
import json, sys
from pathlib import Path

from spp_cli.stages.verify import verify_checkpoint

run = Path(sys.argv[1])
parents = {"spp-bf16": "wanda-2of4", "spp-fp16": "wanda-2of4", "masked-lora-bf16": "sparsegpt-50",
           "masked-lora-fp16": "sparsegpt-50"}
reports = {name: verify_checkpoint(run / name, run / parent) if (run / name).is_dir() else {"ok": False,
           "problems": [f"{run / name} is missing: its stage did not finish"]} for name, parent in parents.items()}
print(json.dumps({"ok": all(r["ok"] for r in reports.values()), "models": reports}, indent=2, default=str))
sys.exit(0 if all(r["ok"] for r in reports.values()) else 1)
PYTHON
step bench-7b "${LIMITS[4]}" "$OUT/bench-7b.json" "$PY" -m spp_cli bench "${BENCH_7B[@]}" --format json
step bench-70b "${LIMITS[5]}" "$OUT/bench-70b.json" "$PY" -m spp_cli bench "${BENCH_70B[@]}" --format json

"$PY" - "$STEPS" "$OUT/summary.json" "$MODE" "$STARTED" <<'PYTHON'
import json, subprocess, sys, time

steps_file, out, mode, started = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
steps = []
for line in open(steps_file, encoding="utf-8"):
    name, code, seconds, command = line.rstrip("\n").split("\t", 3)
    steps.append({"step": name, "exit_code": None if code == "skipped" else int(code),
                  "timed_out": code in ("124", "137"), "skipped": code == "skipped",
                  "seconds": round(float(seconds), 2), "command": command})
gpu = None
if mode == "gpu":
    query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    gpu = subprocess.run(query, capture_output=True, text=True).stdout.strip() or None
summary = {"mode": mode, "ok": all(step["exit_code"] == 0 for step in steps), "gpu": gpu,
           "total_seconds": round(time.time() - started, 1), "steps": steps}
open(out, "w", encoding="utf-8").write(json.dumps(summary, indent=2) + "\n")
print(json.dumps({"ok": summary["ok"], "total_seconds": summary["total_seconds"],
                  "failed": [s["step"] for s in steps if s["exit_code"] != 0]}))
sys.exit(0 if summary["ok"] else 1)
PYTHON
code=$?
rm -rf "$WORK"
exit $code
