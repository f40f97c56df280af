#!/usr/bin/env bash
# The device check in one call (benchmarks/gpu/README.md gives the `run` call that starts it): install the wheels
# carried in .whl/ (what the device image lacks) into /tmp/site, then benchmarks/gpu/device_check.py: the tests
# marked gpu, then the cost benchmark. Everything lands in $OUT: gpu_<device>.json (rewritten after each stage,
# so a call cut short keeps what it measured), device_check.log and environment.txt.
# Extra arguments go to device_check.py: `--rounds 0` runs the tests alone, `--no_tests` the benchmark alone.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$(mktemp -d)}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export WANDB_DISABLED=true TQDM_DISABLE=1

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || { echo "installing the carried wheels failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD:$PYTHONPATH  # this checkout's sftmix, not an installed one

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    python3 -m pip list 2>/dev/null | grep -iE '^(torch|triton|transformers|trl|datasets|accelerate|peft|liger|pyarrow|fsspec|huggingface)'
    echo "pip check (requirements the carried wheels leave unmet; --no-deps installs ignore them):"
    python3 -m pip check
} >"$OUT/environment.txt" 2>&1
# Fail in seconds, not after minutes, when an import is missing
python3 -c "import trl, datasets, peft, sftmix.sftmix_trainer" || { echo "imports failed: see above" >&2; exit 1; }

python3 benchmarks/gpu/device_check.py --out "$OUT/" "$@" 2>&1 | tee "$OUT/device_check.log"
