#!/usr/bin/env bash
# The recovery study of issue 24 on Gemma 3 270M, run on a lent GPU through the device tool, whose calls carry at
# most 64 MiB each (working tree included) and bring back only what lands in $OUT. The model's Q4_K_M GGUF
# (253 MB, the one ../shared/models/gemma3-270m.sh assembles and checks) therefore travels in chunks over several
# calls of one warm machine, kept in /root/gg between them.
#
#   bash scripts/device_study.sh data DATA MODEL    here: make .devdata/ from DATA (../shared/data) and the built
#                                                     Gemma 3 270M folder MODEL (gemma3-270m.sh's output)
#   bash scripts/device_study.sh split GGUF MIB...   here: cut GGUF into .gg1/, .gg2/, ... of these sizes (the last
#                                                     chunk takes the rest); each is one call's `carry`
#   bash scripts/device_study.sh chunk N              there: keep .ggN/'s chunk in /root/gg
#   bash scripts/device_study.sh probe [STEPS]        there: install .whl/ (lm-eval, datasets), then the study's
#                                                     rows at STEPS (default 6) on a random model of Gemma 3 270M's
#                                                     shape: the pipeline on the GPU and each stage's cost
#   bash scripts/device_study.sh study STEPS SECONDS  there: assemble and check the GGUF, convert it (float32 holding
#                                                     the bf16 weights: scripts/study_model.py), run every row at
#                                                     STEPS fine-tune steps within SECONDS
#   bash scripts/device_study.sh probe-cpu            here: the probe at tiny sizes on the CPU (< 5 minutes)
#
# Data: .devdata/, a copy of the shared/data files the study reads (calibration, Alpaca, WikiText-2, 4 tasks),
# Gemma 3 270M's config.json and its tokenizer files as transformers 5.25 writes them (tokenizer.json xz-compressed:
# scripts/study_model.py says why), made here by the `data` mode and carried (git ignores it). Everything comes back as $OUT/log.txt,
# $OUT/<name>.json (benchmarks/recovery_study.py's JSON) and $OUT/<name>-run.tgz (every stage's spp.json, the eval's
# results.json and report, the recipes).
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:?usage: bash scripts/device_study.sh data|split|chunk|probe|study|probe-cpu ...}
shift
PY=${PYTHON:-python3}
OUT=${OUT:-./device-study-out}
DATA=$PWD/.devdata
[[ -d /root/devdata ]] && DATA=/root/devdata  # the probe's copy, kept for the study's call
SHA=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818  # the GGUF's (gemma3-270m.sh)
TASKS=boolq,rte,winogrande,arc_easy
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

install_wheels() {
    if [[ ! -f /root/site/.spp-installed ]]; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /root/site \
            .whl/*.whl && touch /root/site/.spp-installed || return 1
    fi
    export PYTHONPATH="$PWD:/root/site"
    "$PY" -c "import torch, transformers, lm_eval, datasets; print('torch', torch.__version__, 'cuda',
torch.cuda.is_available(), 'transformers', transformers.__version__, 'lm_eval', lm_eval.__version__,
'datasets', datasets.__version__)"
}

# study NAME MODEL TIMEOUT ARGS...: benchmarks/recovery_study.py on MODEL, its JSON and the run's records to $OUT
study() {
    local name=$1 model=$2 limit=$3
    shift 3
    local work=/root/study-$name
    timeout -k 10 "$limit" "$PY" -m benchmarks.recovery_study --profile gemma --model "$model" --data-dir "$DATA" \
        --work "$work" --out "$OUT/$name.json" --zero-shot "$TASKS" --rc-best "$@"
    local code=$?
    tar czf "$OUT/$name-run.tgz" -C "$work" --exclude='*.safetensors' --exclude='*.bin' --exclude='checkpoint-*' \
        --exclude='*.pt' --exclude='tokenizer.json' . 2> /dev/null
    echo "== $name: exit $code"
    return $code
}

case $MODE in
data)
    source=${1:?data DATA MODEL} model=${2:?data DATA MODEL}
    rm -rf .devdata && mkdir -p .devdata/gemma3-270m-tokenizer || exit 1
    (cd "$source" && cp --parents c4/c4-train.00000-of-01024.first1000.jsonl alpaca/alpaca_small.json \
        wikitext-2-raw-v1/test.jsonl wikitext-2-raw-v1/validation.jsonl boolq/boolq.jsonl rte/validation.parquet \
        winogrande/winogrande.jsonl arc_easy/arc_easy.jsonl "$OLDPWD/.devdata/") || exit 1
    cp "$model/config.json" .devdata/gemma3-270m-config.json
    cp "$model/tokenizer_config.json" .devdata/gemma3-270m-tokenizer/
    xz -9 -c "$model/tokenizer.json" > .devdata/gemma3-270m-tokenizer/tokenizer.json.xz
    du -sh .devdata
    ;;
split)
    gguf=${1:?split GGUF MIB...}
    shift
    offset=0 index=1
    for mib in "$@" rest; do
        mkdir -p ".gg$index" && rm -f ".gg$index"/*
        if [[ $mib == rest ]]; then
            tail -c "+$((offset + 1))" "$gguf" > ".gg$index/part"
        else
            tail -c "+$((offset + 1))" "$gguf" | head -c "$((mib * 1048576))" > ".gg$index/part"
            offset=$((offset + mib * 1048576))
        fi
        echo ".gg$index: $(stat -c %s ".gg$index/part") bytes"
        index=$((index + 1))
    done
    ;;
chunk)
    mkdir -p /root/gg && cp ".gg$1/part" "/root/gg/part$1" && ls -l /root/gg
    ;;
probe|probe-cpu)
    mkdir -p "$OUT"
    exec > >(tee -a "$OUT/log.txt") 2>&1
    if [[ $MODE == probe ]]; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
        install_wheels || exit 1
        rm -rf /root/devdata && cp -r .devdata /root/devdata && DATA=/root/devdata
        sizes=(--steps "${1:-6}" --batch 8 --seqlen 512 --val-size 64 --points 2 --curve-windows 16
               --eval-windows 200 --eval-batch 32 --reconstruct-epochs 0)
        blocks=() model=/root/gemma-shape
    else
        export PYTHONPATH="$PWD"
        PY=${PYTHON:-.venv/bin/python}
        sizes=(--steps 2 --batch 2 --seqlen 128 --val-size 4 --points 2 --curve-windows 2 --eval-windows 4
               --reconstruct-epochs 1)
        blocks=(--blocks 2 --vocab 4096) model=${TMPDIR:-/tmp}/spp-gemma-shape
    fi
    rm -rf "$model"
    "$PY" scripts/study_model.py random "$DATA/gemma3-270m-config.json" "$model" "${blocks[@]}" || exit 1
    study probe "$model" 300 --rows w24,w24-dsnot,w24-rc,w24-spp-sft,w24-mlora-distill "${sizes[@]}" \
        --deadline 280 --eval-reserve 100
    ;;
study)
    steps=${1:?study STEPS SECONDS} seconds=${2:?study STEPS SECONDS}
    mkdir -p "$OUT"
    exec > >(tee -a "$OUT/log.txt") 2>&1
    started=$(date +%s)
    install_wheels || exit 1
    cat /root/gg/part* > /root/gemma.gguf
    [[ $(sha256sum /root/gemma.gguf | cut -d' ' -f1) == "$SHA" ]] || { echo "GGUF sha256 mismatch"; exit 1; }
    "$PY" scripts/study_model.py gguf /root/gemma.gguf /root/gemma3-270m --dtype float32 \
        --tokenizer "$DATA/gemma3-270m-tokenizer" || exit 1
    echo "== model ready after $(($(date +%s) - started)) s"
    left=$((seconds - ($(date +%s) - started)))
    study recovery_study_gemma /root/gemma3-270m "$left" --rows all --steps "$steps" --batch 8 --seqlen 512 \
        --val-size 64 --points 4 --curve-windows 16 --eval-windows 200 --eval-batch 32 --reconstruct-epochs 0 \
        --deadline $((left - 20)) --eval-reserve "${EVAL_RESERVE:-150}"
    ;;
*)
    echo "unknown mode $MODE: use data, split, chunk, probe, study or probe-cpu" >&2
    exit 2
    ;;
esac
