#!/usr/bin/env bash
# The whole GPU comparison in one go (bench/gpu_check.py): torch eager fp16 vs torch.compile vs
# ONNX Runtime CUDA vs TensorRT, SD2.1-base UNet size, 512x512, batch 1/4/8, TiUE vs looped 4-step.
#
# The GPU machine has torch (CUDA), onnxruntime and transformers but no diffusers and no network, so
# diffusers travels as wheels. Where PyPI is reachable (once, from the repo root):
#     bench/gpu_check.sh --fetch-wheels          # -> $WHEEL_DIR (default .whl/, git-ignored locally)
#                                                # WHEEL_PYTHON=3.11 for another Python than the GPU's 3.12
# On the GPU machine, from the repo root (the wheels dir carried along):
#     bench/gpu_check.sh [--batches 1,4,8] [--budget-s 480] [--skip compile,...]
# The table is printed as it fills and written to $OUT/gpu_check.md (or ./gpu_check.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEEL_DIR=${WHEEL_DIR:-.whl}

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    # What the GPU machine's image lacks (docs/benchmarks.md): diffusers for the engine and benches, and
    # the service's web stack for bench/gpu_service.sh. It has torch, transformers, numpy, pillow,
    # accelerate, safetensors, huggingface-hub, prometheus-client, httpx, anyio, h11, click and uvloop.
    # Each at the version installed here (the one the tests ran), for the GPU machine's Python; no torch.
    pins=$("$PY" - <<'PY'
from importlib.metadata import PackageNotFoundError, version

MISSING = (
    "diffusers", "importlib_metadata", "lazy_importer",  # the engine
    "fastapi", "starlette", "opentelemetry_api", "pydantic", "pydantic_core", "annotated_types",
    "typing_inspection", "typing_extensions", "pydantic_settings", "python_dotenv", "uvicorn",
    "fastapi_offline",  # the service
)
for name in MISSING:
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        print(name)
PY
)
    mkdir -p "$WHEEL_DIR"
    rm -f "$WHEEL_DIR"/*.whl  # one version of each: two stop the install there
    platforms=()
    for tag in manylinux2014 manylinux_2_17 manylinux_2_27 manylinux_2_28 manylinux_2_34; do
        platforms+=(--platform "${tag}_x86_64")
    done
    # shellcheck disable=SC2086  # one requirement a word
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --implementation cp \
        --python-version "${WHEEL_PYTHON:-3.12}" "${platforms[@]}" -d "$WHEEL_DIR" $pins
    ls -l "$WHEEL_DIR"
    du -sh "$WHEEL_DIR"
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
