#!/usr/bin/env bash
# Download, here, the wheels the GPU machine's image lacks into .whl/ (ignored by git), for the device tool to carry
# (`carry: [".whl"]`); scripts/gpu_check.sh installs them with pip --no-index --no-deps --target /tmp/site.
#
#   bash scripts/gpu_wheels.sh              # nothing by default: the device check's chain needs no package beyond
#                                           # the image's (Python 3.12, torch 2.11, transformers 5.17, accelerate,
#                                           # peft, typer, rich, pyyaml, safetensors, matplotlib)
#   bash scripts/gpu_wheels.sh --zero-shot  # + lm-eval and datasets with what they need that the image lacks, for
#                                           # `spp eval --tasks boolq,...` on the device (about 15 MB)
#
# The pip command is the device README's: binary wheels for CPython 3.12 on manylinux x86-64, no dependencies
# resolved (each one is listed here, at the version the development venv runs). Packages published as source only
# (pure Python) are built into wheels with `pip wheel --no-deps`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# lm-eval and datasets, and what they need beyond the image (pyarrow, pandas, scikit-learn, sacrebleu, nltk's
# needs, xxhash, fsspec, jinja2 are there)
ZERO_SHOT=(lm-eval==0.4.13 datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19
           pytablewriter==1.2.1 DataProperty==1.1.1 mbstrdecoder==1.1.5 pathvalidate==3.3.1 tabledata==1.3.5
           tcolorpy==0.1.7 typepy==1.3.5 chardet==6.0.0.post1 more-itertools==11.2.1 nltk==3.10.4)
SOURCE_ONLY=(rouge-score==0.1.2 word2number==1.1 sqlitedict==2.1.0)

WANTED=()
SOURCES=()
if [[ "${1:-}" == "--zero-shot" ]]; then
    WANTED=("${ZERO_SHOT[@]}")
    SOURCES=("${SOURCE_ONLY[@]}")
elif [[ $# -gt 0 ]]; then
    echo "usage: bash scripts/gpu_wheels.sh [--zero-shot]" >&2
    exit 2
fi
if [[ ${#WANTED[@]} -eq 0 ]]; then
    echo "the device check needs no wheels beyond the GPU image's packages; --zero-shot adds lm-eval and datasets"
    exit 0
fi
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || grep -qx '/.whl/' .gitignore || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
PLATFORMS=()
for platform in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
                manylinux1_x86_64 manylinux_2_24_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64; do
    PLATFORMS+=(--platform "$platform")
done
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
    -d .whl "${WANTED[@]}"
"$PY" -m pip wheel --no-deps -w .whl "${SOURCES[@]}"
du -sh .whl
echo "carry .whl with the device run (the tool's limit is 64 MiB for the working tree and carried paths together)"
