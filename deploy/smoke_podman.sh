#!/usr/bin/env bash
# Container smoke test: build the CPU image with podman, run it the way Kubernetes runs it (non-root,
# read-only root filesystem, no capabilities), and check that it generates a PNG, answers /metrics,
# passes its HEALTHCHECK, and on SIGTERM answers the request in flight before it exits 0.
#
# Works without a registry and without network inside the build: the base image can be made with
# debootstrap, and the Python wheels are downloaded on the host and handed to the build as a build
# context (the Dockerfile's `wheels` stage), so pip inside the build never reaches an index.
#
# Usage: deploy/smoke_podman.sh [--keep] [--help]
#   --keep   leave the container running afterwards (its name and port are printed)
#
# Environment (all optional):
#   SMOKE_BASE_IMAGE       base of the cpu target. Default localhost/tiue-base:bookworm, made with
#                          debootstrap (root, network to the Debian archive) when it does not exist.
#                          With a registry at hand: SMOKE_BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm
#   SMOKE_DEBIAN_MIRROR    mirror for debootstrap (default http://deb.debian.org/debian)
#   SMOKE_WORK_DIR         wheelhouse and rootfs scratch (default /var/tmp/tiue-smoke)
#   SMOKE_TORCH_INDEX_URL  where the CPU torch wheel comes from (default the PyTorch CPU index; pip's own
#                          find-links/indexes are used as well)
#   SMOKE_IMAGE            image tag to build (default localhost/tiue-serve:smoke)
#   SMOKE_PORT             host port on 127.0.0.1 (default 18080)
#   SMOKE_READY_TIMEOUT_S  how long the model may take to load and warm (default 300)
#   SMOKE_BUILD_NETWORK    network of the build's RUN steps (default none: proves the build is offline)
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

KEEP=0
for arg in "$@"; do
  case "$arg" in
    --keep) KEEP=1 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
  esac
done

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BASE_IMAGE="${SMOKE_BASE_IMAGE:-localhost/tiue-base:bookworm}"
DEBIAN_MIRROR="${SMOKE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
WORK_DIR="${SMOKE_WORK_DIR:-/var/tmp/tiue-smoke}"
TORCH_INDEX_URL="${SMOKE_TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}"
IMAGE="${SMOKE_IMAGE:-localhost/tiue-serve:smoke}"
PORT="${SMOKE_PORT:-18080}"
READY_TIMEOUT_S="${SMOKE_READY_TIMEOUT_S:-300}"
BUILD_NETWORK="${SMOKE_BUILD_NETWORK:-none}"
NAME="tiue-smoke-$$"
URL="http://127.0.0.1:${PORT}"
OUT="$(mktemp -d)"

# runc refuses rlimits above the caller's hard limits (the defaults are higher in many sandboxes).
ULIMITS=(--ulimit "nofile=$(( $(ulimit -Hn) < 16384 ? $(ulimit -Hn) : 16384 ))"
         --ulimit "nproc=$(( $(ulimit -Hu) < 8192 ? $(ulimit -Hu) : 8192 ))")

step() { printf '\n== %s\n' "$*"; }
ok() { printf 'ok   %s\n' "$*"; }
die() { printf 'FAIL %s\n' "$*" >&2; exit 1; }

cleanup() {
  local rc=$?
  if [[ $rc -ne 0 ]] && podman container exists "$NAME" 2>/dev/null; then
    echo "--- container logs (last 60 lines)" >&2
    podman logs --tail 60 "$NAME" >&2 2>&1 || true
  fi
  if [[ $KEEP -eq 0 ]]; then
    podman rm -f -t 0 "$NAME" >/dev/null 2>&1 || true
  fi
  rm -rf "$OUT"
  exit "$rc"
}
trap cleanup EXIT

command -v podman >/dev/null || die "podman is not installed (Debian: apt-get install podman)"
command -v curl >/dev/null || die "curl is not installed"
mkdir -p "$WORK_DIR"

step "base image: $BASE_IMAGE"
if podman image exists "$BASE_IMAGE"; then
  ok "present"
elif [[ "$BASE_IMAGE" == localhost/tiue-base:* ]]; then
  command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
  suite="${BASE_IMAGE##*:}"
  rootfs="$WORK_DIR/rootfs-$suite"
  rm -rf "$rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv "$suite" "$rootfs" "$DEBIAN_MIRROR" \
    > "$WORK_DIR/debootstrap.log" 2>&1 || die "debootstrap failed, see $WORK_DIR/debootstrap.log"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
  ok "made with debootstrap ($suite)"
else
  podman pull "$BASE_IMAGE" >/dev/null || die "cannot pull $BASE_IMAGE"
  ok "pulled"
fi
PY_VERSION="$(podman run --rm "${ULIMITS[@]}" --network none --entrypoint python3 "$BASE_IMAGE" \
  -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
ok "python $PY_VERSION in the base image"

step "wheelhouse for python $PY_VERSION (downloaded on the host)"
WHEELS="$WORK_DIR/wheels-py$PY_VERSION"
mkdir -p "$WHEELS"
REQS="$OUT/requirements.txt"
python3 - "$REPO_ROOT/pyproject.toml" > "$REQS" <<'PY'
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

project = tomllib.load(open(sys.argv[1], "rb"))["project"]
for requirement in project["dependencies"] + project["optional-dependencies"]["onnx"]:
    print(requirement)
print("setuptools>=68")  # the build backend, for building the project inside the image
print("wheel")
PY
index_args=()
if [[ -n "$TORCH_INDEX_URL" ]]; then
  # An index that cannot be reached costs pip retries on every requirement: check it once.
  if curl -fsS -o /dev/null -m 10 "${TORCH_INDEX_URL%/}/torch/" 2>/dev/null; then
    index_args=(--extra-index-url "$TORCH_INDEX_URL")
  else
    echo "note $TORCH_INDEX_URL is not reachable: torch must come from pip's own indexes or find-links"
  fi
fi
python3 -m pip download --quiet --disable-pip-version-check -d "$WHEELS" "${index_args[@]}" \
  --only-binary=:all: --implementation cp --python-version "$PY_VERSION" \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform linux_x86_64 -r "$REQS" 2>"$OUT/pip.err" \
  || { cat "$OUT/pip.err" >&2; die "pip download failed"; }
ls "$WHEELS"/torch-*+cpu-*.whl >/dev/null 2>&1 || die "no CPU torch wheel in $WHEELS (set SMOKE_TORCH_INDEX_URL)"
ok "$(find "$WHEELS" -name '*.whl' | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1), torch: $(basename "$(ls "$WHEELS"/torch-*.whl)")"

step "build $IMAGE (target cpu, RUN network: $BUILD_NETWORK)"
start=$(date +%s)
podman build --format docker --target cpu --network "$BUILD_NETWORK" "${ULIMITS[@]}" \
  --build-arg "BASE_IMAGE=$BASE_IMAGE" \
  --build-context "wheels=$WHEELS" --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=/wheels \
  -t "$IMAGE" "$REPO_ROOT" > "$WORK_DIR/build.log" 2>&1 \
  || { tail -40 "$WORK_DIR/build.log" >&2; die "build failed, see $WORK_DIR/build.log"; }
ok "built in $(( $(date +%s) - start )) s, $(podman image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"
[[ "$(podman image inspect --format '{{.Config.User}}' "$IMAGE")" == "10001:10001" ]] || die "image user is not 10001:10001"
ok "runs as 10001:10001"

step "run (read-only root, no capabilities, no new privileges) on 127.0.0.1:$PORT"
podman run -d --name "$NAME" "${ULIMITS[@]}" \
  --read-only --tmpfs /tmp:rw,size=512m,mode=1777 --cap-drop ALL --security-opt no-new-privileges \
  -p "127.0.0.1:$PORT:8000" "$IMAGE" >/dev/null 2>"$OUT/run.err" \
  || { cat "$OUT/run.err" >&2; die "podman run failed"; }

wait_for() {  # wait_for PATH TIMEOUT_S: until GET PATH answers 200, failing early if the container exits
  local path=$1 deadline=$(( $(date +%s) + $2 ))
  until curl -fsS -o /dev/null -m 2 "$URL$path" 2>/dev/null; do
    [[ "$(podman inspect --format '{{.State.Running}}' "$NAME")" == "true" ]] || die "container exited"
    (( $(date +%s) < deadline )) || die "$path not 200 after $2 s"
    sleep 1
  done
}
start=$(date +%s)
wait_for /livez 60
ok "/livez 200 after $(( $(date +%s) - start )) s"
wait_for /readyz "$READY_TIMEOUT_S"
ok "/readyz 200 after $(( $(date +%s) - start )) s (model loaded and warmed)"
podman healthcheck run "$NAME" >/dev/null 2>&1 || die "the image's HEALTHCHECK fails"
ok "HEALTHCHECK passes"

step "POST /generate"
code=$(curl -sS -m 120 -o "$OUT/image.png" -w '%{http_code} %{content_type}' -D "$OUT/headers" \
  -H 'Content-Type: application/json' -H 'Accept: image/png' \
  -d '{"prompt": "a red circle on a white background", "n": 1, "seed": 7}' "$URL/generate")
[[ "$code" == "200 image/png" ]] || { head -c 600 "$OUT/image.png" >&2; die "raw PNG request answered '$code'"; }
python3 - "$OUT/image.png" <<'PY' || die "the answer is not a PNG"
import struct
import sys

data = open(sys.argv[1], "rb").read()
assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:16]
width, height = struct.unpack(">II", data[16:24])
print(f"ok   PNG {width}x{height}, {len(data)} bytes")
PY
seed=$(grep -i '^x-seed:' "$OUT/headers" | tr -d '\r' | cut -d' ' -f2 || true)
[[ -z "$seed" ]] || ok "seed header: $seed"

code=$(curl -sS -m 120 -o "$OUT/batch.json" -w '%{http_code}' -H 'Content-Type: application/json' \
  -d '{"prompt": "a blue square", "n": 2, "seed": 11}' "$URL/generate")
[[ "$code" == "200" ]] || { head -c 600 "$OUT/batch.json" >&2; die "JSON request answered $code"; }
python3 - "$OUT/batch.json" <<'PY' || die "the JSON answer is wrong"
import base64
import json
import sys

body = json.load(open(sys.argv[1]))
images = [base64.b64decode(item["b64_json"]) for item in body["data"]]
assert len(images) == 2, len(images)
assert all(image[:8] == b"\x89PNG\r\n\x1a\n" for image in images)
assert images[0] != images[1], "two seeds gave the same image"
print(f"ok   JSON: 2 PNGs, seeds {[item.get('seed') for item in body['data']]}, timings {body.get('timings')}")
PY

step "GET /metrics"
curl -fsS -m 10 -o "$OUT/metrics.txt" "$URL/metrics" || die "/metrics did not answer 200"
for family in tiue_request_duration_seconds_bucket tiue_queue_wait_seconds_bucket tiue_batch_size_images_bucket \
              tiue_stage_duration_seconds_bucket tiue_images_generated_total tiue_queue_depth tiue_ready; do
  grep -q "^$family" "$OUT/metrics.txt" || die "/metrics has no $family"
done
images=$(awk '/^tiue_images_generated_total /{print int($2)}' "$OUT/metrics.txt")
[[ "$images" -ge 3 ]] || die "tiue_images_generated_total is $images, expected >= 3"
ok "metric families present; tiue_images_generated_total=$images; $(grep -E '^tiue_ready ' "$OUT/metrics.txt")"

if [[ $KEEP -eq 1 ]]; then
  printf '\nSMOKE PASSED; container %s left running on %s\n' "$NAME" "$URL"
  exit 0
fi

step "SIGTERM with a request in flight: it is answered, then the process exits 0"
curl -sS -m 120 -o "$OUT/drain.json" -w '%{http_code}' -H 'Content-Type: application/json' \
  -d '{"prompt": "a green triangle", "n": 2, "seed": 3}' "$URL/generate" > "$OUT/drain.code" 2>&1 &
drain_pid=$!
deadline=$(( $(date +%s) + 20 ))
until curl -fsS -m 2 "$URL/metrics" 2>/dev/null | grep -Eq '^tiue_in_flight_requests [1-9]'; do
  (( $(date +%s) < deadline )) || die "the request never showed as in flight"
  sleep 0.2
done
start=$(date +%s)
podman stop -t 45 "$NAME" >/dev/null
wait "$drain_pid" || true
[[ "$(cat "$OUT/drain.code")" == "200" ]] || die "the in-flight request got '$(cat "$OUT/drain.code")' during shutdown"
ok "the in-flight request was answered 200 during shutdown"
code=$(podman inspect --format '{{.State.ExitCode}}' "$NAME")
[[ "$code" == "0" ]] || die "exit code $code after SIGTERM"
ok "exited 0, $(( $(date +%s) - start )) s after SIGTERM"
if podman logs "$NAME" 2>&1 | grep -q 'Traceback'; then
  podman logs "$NAME" 2>&1 | grep -B2 -A20 'Traceback' >&2
  die "a traceback in the logs"
fi
ok "no traceback in the logs"

printf '\nSMOKE PASSED\n'
