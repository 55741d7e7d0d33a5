#!/usr/bin/env bash
# The one command of the device call for bench/gpu_service.py (docs/benchmarks.md, "The service on one GPU").
#
# Where PyPI is reachable, once, from the repo root: bench/gpu_check.sh --fetch-wheels (-> .whl/, ~11 MB:
# diffusers and the service's web stack, which the GPU machine's image lacks; never torch). On the GPU
# machine, from the repo root with .whl carried along:
#     bench/gpu_service.sh [bench/gpu_service.py's flags...]      # e.g. --skip peer, --torch-compile aot
# It installs the wheels and the project (--no-deps: torch stays the machine's own) into a folder of
# its own, checks that everything `tiue serve` imports is importable, then runs the bench under a hard
# timeout. Tables: $OUT/gpu_service.md and .json (rewritten after every row), the run's log and the
# servers' logs beside them. BUDGET_S (default 420) is the bench's own budget; the timeout is 30 s more.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEEL_DIR=${WHEEL_DIR:-.whl}
BUDGET_S=${BUDGET_S:-420}
OUT=${OUT:-$PWD/gpu-service-out}
mkdir -p "$OUT"

site=$(mktemp -d /tmp/tiue-site.XXXXXX)
wheels=()
if compgen -G "$WHEEL_DIR/*.whl" >/dev/null; then
    wheels=("$WHEEL_DIR"/*.whl)
else
    echo "note: no wheels in $WHEEL_DIR: using what is installed (bench/gpu_check.sh --fetch-wheels makes them)"
fi
# The wheels and the project itself, into a folder of their own; no dependency resolution and no index:
# nothing is fetched, and torch stays the machine's own.
"$PY" -m pip install --quiet --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir \
    --target "$site" "${wheels[@]}" .
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PATH="$site/bin:$PATH" PYTHONUNBUFFERED=1
# Everything `tiue serve` and the bench import, before any time goes to the model.
"$PY" -c 'import diffusers, fastapi, uvicorn, pydantic_settings, prometheus_client, service.app, service.cli, engine.pipeline'
"$PY" -m service.cli --help >/dev/null
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true

set +e
timeout --signal=TERM --kill-after=20 "$((${BUDGET_S%.*} + 30))" \
    "$PY" bench/gpu_service.py --out "$OUT" --budget-s "$BUDGET_S" "$@" 2>&1 | tee "$OUT/gpu_service.log"
status=${PIPESTATUS[0]}
[[ -f "$OUT/gpu_service.md" ]] && cat "$OUT/gpu_service.md"
exit "$status"
