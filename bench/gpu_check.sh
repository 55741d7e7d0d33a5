#!/usr/bin/env bash
# The whole GPU comparison in one go (bench/gpu_check.py): torch eager fp16 vs torch.compile vs
# ONNX Runtime CUDA vs TensorRT, SD2.1-base UNet size, 512x512, batch 1/4/8, TiUE vs looped 4-step.
#
# The GPU machine has torch (CUDA), onnxruntime and transformers but no diffusers and no network, so
# diffusers travels as wheels. Where PyPI is reachable (once, from the repo root):
#     bench/gpu_check.sh --fetch-wheels          # -> $WHEEL_DIR (default .whl/, git-ignored locally)
# On the GPU machine, from the repo root (the wheels dir carried along):
#     bench/gpu_check.sh [--batches 1,4,8] [--budget-s 480] [--skip compile,...]
# The table is printed as it fills and written to $OUT/gpu_check.md (or ./gpu_check.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEEL_DIR=${WHEEL_DIR:-.whl}

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    version=$("$PY" -c 'import diffusers; print(diffusers.__version__)' 2>/dev/null || echo 0.42.1)
    # importlib_metadata: a diffusers requirement the GPU image lacks (the rest are there)
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: -d "$WHEEL_DIR" \
        "diffusers==$version" importlib_metadata
    ls -l "$WHEEL_DIR"
    exit 0
fi

if ! "$PY" -c 'import diffusers' 2>/dev/null; then
    if ! compgen -G "$WHEEL_DIR/diffusers-*.whl" >/dev/null; then
        echo "diffusers is not installed and $WHEEL_DIR has no wheel of it:" \
            "run bench/gpu_check.sh --fetch-wheels where PyPI is reachable and bring $WHEEL_DIR along" >&2
        exit 2
    fi
    site=$(mktemp -d /tmp/tiue-site.XXXXXX)
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --target "$site" "$WHEEL_DIR"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA GPU visible to torch"' || {
    echo "no GPU here; for a dry run of the script itself: $PY bench/gpu_check.py --smoke" >&2
    exit 2
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
exec "$PY" bench/gpu_check.py --out "${OUT:-.}/gpu_check.md" "$@"
