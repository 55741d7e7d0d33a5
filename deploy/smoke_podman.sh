#!/usr/bin/env bash
# Container smoke test: build the CPU image with podman, run it the way Kubernetes runs it (non-root,
# read-only root filesystem, no capabilities), and check that it generates a PNG, answers /metrics,
# passes its HEALTHCHECK, and on SIGTERM answers the request in flight before it exits 0.
#
# Works without a registry and without network inside the build: the base image can be made with
# debootstrap, and the Python wheels are downloaded on the host (deploy/download_wheels.sh) and
# handed to the build as a build context (the Dockerfile's `wheels` stage), so pip inside the build
# never reaches an index. Run it as root (or with sudo): debootstrap and rootful podman need it.
#
# Usage: deploy/smoke_podman.sh [--runtime NAME] [--keep | --keep-images] [--help]
#   --runtime NAME  OCI runtime podman runs containers with (runc, crun or a path; also SMOKE_RUNTIME).
#                   Default: podman's own default, or runc when that one fails with the known
#                   "cgroups in hybrid mode not supported" error (crun on a host with cgroup v1 and v2
#                   mounted together). The runtime it used is printed.
#   --keep          leave the container running and keep every image (its name and port are printed)
#   --keep-images   remove the container but keep the images and the wheelhouse, so a rerun takes seconds
# Otherwise it removes what this run made: the container, the image, the build's intermediate
# (build-stage) images, and the base image and the wheelhouse if this run made them. Logs stay in
# SMOKE_WORK_DIR/logs. A failing step prints "FAIL: <step>: <reason>" and the last lines of its log,
# then exits 1 (2 for a bad argument).
#
# Environment (all optional):
#   SMOKE_RUNTIME          as --runtime
#   SMOKE_BASE_IMAGE       base of the cpu target. Default localhost/tiue-base:bookworm, made with
#                          debootstrap (root, network to the Debian archive) when it does not exist.
#                          With a registry at hand: SMOKE_BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm
#   SMOKE_DEBIAN_MIRROR    mirror for debootstrap (default http://deb.debian.org/debian)
#   SMOKE_WORK_DIR         wheelhouse, rootfs scratch and logs (default /var/tmp/tiue-smoke)
#   SMOKE_TORCH_INDEX_URL  where the CPU torch wheel comes from (default the PyTorch CPU index; pip's own
#                          find-links/indexes and the wheelhouse are used as well; see deploy/download_wheels.sh)
#   SMOKE_IMAGE            image tag to build (default localhost/tiue-serve:smoke)
#   SMOKE_PORT             host port on 127.0.0.1 (default 18080)
#   SMOKE_READY_TIMEOUT_S  how long the model may take to load and warm (default 300)
#   SMOKE_BUILD_NETWORK    network of the build's RUN steps (default none: proves the build is offline)
set -Eeuo pipefail
shopt -s inherit_errexit

usage() { sed -n '2,/^set -E/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

KEEP=0
KEEP_IMAGES=0
RUNTIME="${SMOKE_RUNTIME:-}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --keep) KEEP=1; KEEP_IMAGES=1 ;;
    --keep-images) KEEP_IMAGES=1 ;;
    --runtime) [[ $# -ge 2 && -n "$2" ]] || { echo "--runtime needs a name (see --help)" >&2; exit 2; }
               RUNTIME=$2; shift ;;
    --runtime=*) RUNTIME=${1#--runtime=} ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BASE_IMAGE="${SMOKE_BASE_IMAGE:-localhost/tiue-base:bookworm}"
DEBIAN_MIRROR="${SMOKE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
WORK_DIR="${SMOKE_WORK_DIR:-/var/tmp/tiue-smoke}"
LOGS="$WORK_DIR/logs"
TORCH_INDEX_URL="${SMOKE_TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}"
IMAGE="${SMOKE_IMAGE:-localhost/tiue-serve:smoke}"
PORT="${SMOKE_PORT:-18080}"
READY_TIMEOUT_S="${SMOKE_READY_TIMEOUT_S:-300}"
BUILD_NETWORK="${SMOKE_BUILD_NETWORK:-none}"
NAME="tiue-smoke-$$"
URL="http://127.0.0.1:${PORT}"
OUT="$(mktemp -d)"
STARTED=$(date +%s)

# runc refuses rlimits above the caller's hard limits (the defaults are higher in many sandboxes).
ULIMITS=(--ulimit "nofile=$(( $(ulimit -Hn) < 16384 ? $(ulimit -Hn) : 16384 ))"
         --ulimit "nproc=$(( $(ulimit -Hu) < 8192 ? $(ulimit -Hu) : 8192 ))")
RUNTIME_ARGS=()    # podman's global --runtime, once chosen
IMAGES_BEFORE=""   # image ids present before this run: cleanup removes only the others
WHEELS_MADE=0
STEP="setup"

step() { STEP=$1; printf '\n== %s\n' "$2"; }
ok() { printf 'ok   %s\n' "$*"; }
note() { printf 'note %s\n' "$*"; }
pm() { podman "${RUNTIME_ARGS[@]}" "$@"; }

fail() {  # fail REASON [LOG]: name the step and the reason, show the log's last lines, exit 1
  printf 'FAIL: %s: %s\n' "$STEP" "$1" >&2
  if [[ -n "${2:-}" && -s "$2" ]]; then
    printf -- '--- last lines of %s\n' "$2" >&2
    tail -n 25 "$2" >&2
  fi
  exit 1
}

CHECKS_PATH=""  # the wheelhouse's prometheus_client wheel (pure Python, imported from the zip), once downloaded
run_checks() {  # run_checks ARGS...: deploy/smoke_checks.py URL ARGS... on the host's python3 (CI runs the same checks)
  PYTHONPATH="$CHECKS_PATH" python3 "$REPO_ROOT/deploy/smoke_checks.py" "$URL" "$@"
}
checks() {  # checks COMMAND [ARGS...]: run_checks, its ok lines shown; its reason, and its log if longer, on failure
  if run_checks "$@" > "$OUT/check.log" 2> "$OUT/check.err"; then
    cat "$OUT/check.log"
    return
  fi
  cat "$OUT/check.log"
  local log=""
  [[ $(wc -l < "$OUT/check.err") -le 1 ]] || log="$OUT/check.err"  # more than the reason: show it
  fail "$(tail -n 1 "$OUT/check.err")" "$log"
}

on_error() {  # the ERR trap: no command fails silently, even one in a $(...)
  local rc=$1 line=$2 command=$3
  if [[ $BASH_SUBSHELL -gt 0 ]]; then exit "$rc"; fi  # the enclosing command reports it
  fail "\"$command\" exited $rc (line $line)"
}
trap 'on_error $? $LINENO "$BASH_COMMAND"' ERR

cleanup() {
  local rc=$? removed=()
  trap - ERR
  set +e
  if [[ $rc -ne 0 ]] && podman container exists "$NAME" 2>/dev/null; then
    pm logs "$NAME" > "$LOGS/container.log" 2>&1
    printf -- '--- container logs (last 40 lines of %s)\n' "$LOGS/container.log" >&2
    tail -n 40 "$LOGS/container.log" >&2
  fi
  if [[ $KEEP -eq 0 ]]; then
    pm rm -f -t 0 "$NAME" >/dev/null 2>&1
  fi
  if [[ $KEEP_IMAGES -eq 0 && -n "$IMAGES_BEFORE" ]]; then
    mapfile -t removed < <(comm -13 <(echo "$IMAGES_BEFORE") <(podman images -a -q --no-trunc | sort -u))
    if [[ ${#removed[@]} -gt 0 ]]; then
      podman rmi -f "${removed[@]}" >/dev/null 2>&1 || podman image prune -f >/dev/null 2>&1
    fi
    [[ $WHEELS_MADE -eq 0 ]] || rm -rf "$WHEELS"
    printf '\ncleanup: removed the container, %d image(s) this run made%s (--keep-images keeps them)\n' \
      "${#removed[@]}" "$([[ $WHEELS_MADE -eq 0 ]] || echo " and the wheelhouse")"
  fi
  rm -rf "$OUT"
  exit "$rc"
}
trap cleanup EXIT

step prerequisites "prerequisites"
mkdir -p "$LOGS"
command -v podman >/dev/null || fail "podman is not installed (Debian: apt-get install -y podman runc)"
command -v curl >/dev/null || fail "curl is not installed (Debian: apt-get install -y curl)"
command -v python3 >/dev/null || fail "python3 is not installed (Debian: apt-get install -y python3-pip)"
podman info > "$LOGS/podman-info.log" 2>&1 || fail "podman info failed" "$LOGS/podman-info.log"
IMAGES_BEFORE=$(podman images -a -q --no-trunc | sort -u)
IMAGES_BEFORE=${IMAGES_BEFORE:-none}
ok "podman $(podman version --format '{{.Client.Version}}'), run as $(id -un)"

step "base image" "base image: $BASE_IMAGE"
if podman image exists "$BASE_IMAGE"; then
  ok "present"
elif [[ "$BASE_IMAGE" == localhost/tiue-base:* ]]; then
  command -v debootstrap >/dev/null || fail "debootstrap is not installed (Debian: apt-get install -y debootstrap)"
  [[ $EUID -eq 0 ]] || fail "debootstrap needs root: run this with sudo, or name a base with SMOKE_BASE_IMAGE"
  suite="${BASE_IMAGE##*:}"
  rootfs="$WORK_DIR/rootfs-$suite"
  rm -rf "$rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv "$suite" "$rootfs" "$DEBIAN_MIRROR" \
    > "$LOGS/debootstrap.log" 2>&1 || fail "debootstrap $suite from $DEBIAN_MIRROR failed" "$LOGS/debootstrap.log"
  # What a container never reads (python:3.11-slim drops the same): package caches and lists, logs,
  # documentation, manual pages and translations.
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/* \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/*
  tar -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" > "$LOGS/import.log" 2>&1 \
    || fail "podman import of the debootstrap tree failed" "$LOGS/import.log"
  rm -rf "$rootfs"
  ok "made with debootstrap ($suite)"
else
  podman pull "$BASE_IMAGE" > "$LOGS/pull.log" 2>&1 || fail "cannot pull $BASE_IMAGE" "$LOGS/pull.log"
  ok "pulled"
fi

step runtime "container runtime"
probe() {  # probe [PODMAN GLOBAL ARGS...]: run python3 in the base image; its version is the log's last line
  podman "$@" run --rm "${ULIMITS[@]}" --network none --entrypoint python3 "$BASE_IMAGE" \
    -c 'import sys; print("%d.%d" % sys.version_info[:2])' > "$LOGS/runtime.log" 2>&1
}
default_runtime=$(podman info --format '{{.Host.OCIRuntime.Name}}')
if [[ -n "$RUNTIME" ]]; then
  RUNTIME_ARGS=(--runtime "$RUNTIME")
  probe "${RUNTIME_ARGS[@]}" || fail "runtime '$RUNTIME' (asked for) cannot run a container here" "$LOGS/runtime.log"
  ok "runtime $RUNTIME (asked for; podman's default is $default_runtime)"
elif probe; then
  RUNTIME=$default_runtime
  ok "runtime $RUNTIME (podman's default)"
elif grep -q "cgroups in hybrid mode not supported" "$LOGS/runtime.log"; then
  note "$default_runtime cannot run containers on this host: $(grep -m 1 -o 'cgroups in hybrid mode.*' "$LOGS/runtime.log")"
  cp "$LOGS/runtime.log" "$LOGS/runtime-$default_runtime.log"
  RUNTIME=runc
  RUNTIME_ARGS=(--runtime runc)
  probe "${RUNTIME_ARGS[@]}" || fail "$default_runtime fails on cgroups in hybrid mode and runc failed too$(
    command -v runc >/dev/null || echo " (runc is not installed: apt-get install -y runc)")" "$LOGS/runtime.log"
  ok "runtime runc (instead of podman's default, $default_runtime; --runtime or SMOKE_RUNTIME choose one)"
else
  fail "podman's default runtime, $default_runtime, cannot run a container here (try --runtime runc)" "$LOGS/runtime.log"
fi
PY_VERSION=$(tail -n 1 "$LOGS/runtime.log")
[[ "$PY_VERSION" =~ ^3\.[0-9]+$ ]] || fail "no python3 version from the base image" "$LOGS/runtime.log"
ok "python $PY_VERSION in the base image"

step wheels "wheelhouse for python $PY_VERSION (downloaded on the host)"
WHEELS="$WORK_DIR/wheels-py$PY_VERSION"
[[ -d "$WHEELS" ]] || WHEELS_MADE=1
"$REPO_ROOT/deploy/download_wheels.sh" --python-version "$PY_VERSION" --torch-index-url "$TORCH_INDEX_URL" \
  "$WHEELS" > "$LOGS/wheels.log" 2>&1 || fail "deploy/download_wheels.sh failed" "$LOGS/wheels.log"
grep -E '^(ok|note) ' "$LOGS/wheels.log"
# The checks read /metrics with prometheus_client's parser, the very version the image serves with: from its
# wheel, so the host's python3 needs nothing installed.
CHECKS_PATH=$(compgen -G "$WHEELS/prometheus_client-*-py3-none-any.whl" | head -n 1) \
  || fail "no prometheus_client wheel in $WHEELS" "$LOGS/wheels.log"

step build "build $IMAGE (target cpu, RUN network: $BUILD_NETWORK, runtime $RUNTIME)"
start=$(date +%s)
pm build --format docker --target cpu --network "$BUILD_NETWORK" "${ULIMITS[@]}" \
  --build-arg "BASE_IMAGE=$BASE_IMAGE" \
  --build-context "wheels=$WHEELS" --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=/wheels \
  -t "$IMAGE" "$REPO_ROOT" > "$LOGS/build.log" 2>&1 || fail "podman build failed" "$LOGS/build.log"
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
ok "built in $(( $(date +%s) - start )) s, $(awk -v s="$size" 'BEGIN {printf "%.0f MB", s / 1e6}')"
[[ "$(podman image inspect --format '{{.Config.User}}' "$IMAGE")" == "10001:10001" ]] \
  || fail "the image's user is not 10001:10001"
ok "runs as 10001:10001"
# Only what serves: no sources, tests, training code, pip or caches; and what the size is made of.
pm run --rm -i "${ULIMITS[@]}" --network none --user 0:0 --entrypoint /bin/sh "$IMAGE" -s \
  > "$LOGS/contents.log" 2> "$LOGS/contents.err" <<'SH' || fail "cannot look into the image" "$LOGS/contents.err"
site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
for path in /src /root/.cache "$site/distill" "$site/engine/distill" "$site/tests" "$site/pip" "$site/setuptools"; do
  [ ! -e "$path" ] || echo "extra $path"
done
find "$site" -type d -name tests | sed 's/^/extra /'
cd "$site" && for path in /opt/venv torch transformers sympy onnxruntime; do du -sm "$path"; done | sed 's/^/size /'
SH
! grep -q '^extra ' "$LOGS/contents.log" || fail "the image holds what does not serve" "$LOGS/contents.log"
ok "holds only what serves: $(awk '/^size /{printf "%s%s %s MB", (n++ ? ", " : ""), $3, $2}' "$LOGS/contents.log")"

step run "run (read-only root, no capabilities, no new privileges) on 127.0.0.1:$PORT"
pm run -d --name "$NAME" "${ULIMITS[@]}" \
  --read-only --tmpfs /tmp:rw,size=512m,mode=1777 --cap-drop ALL --security-opt no-new-privileges \
  -p "127.0.0.1:$PORT:8000" "$IMAGE" > "$LOGS/run.log" 2>&1 || fail "podman run failed" "$LOGS/run.log"

wait_for() {  # wait_for PATH TIMEOUT_S: until GET PATH answers 200, failing early if the container exits
  local path=$1 deadline=$(( $(date +%s) + $2 )) running
  until curl -fsS -o /dev/null -m 2 "$URL$path" 2>/dev/null; do
    running=$(pm inspect --format '{{.State.Running}}' "$NAME")
    [[ "$running" == "true" ]] || fail "the container exited while waiting for $path"
    (( $(date +%s) < deadline )) || fail "$path not 200 after $2 s"
    sleep 1
  done
}
start=$(date +%s)
wait_for /livez 60
ok "/livez 200 after $(( $(date +%s) - start )) s"
STEP=ready
wait_for /readyz "$READY_TIMEOUT_S"
ok "/readyz 200 after $(( $(date +%s) - start )) s (model loaded and warmed)"
STEP=healthcheck
pm healthcheck run "$NAME" > "$LOGS/healthcheck.log" 2>&1 || fail "the image's HEALTHCHECK fails" "$LOGS/healthcheck.log"
ok "HEALTHCHECK passes"

step generate "POST /generate"
checks generate

step metrics "GET /metrics"
checks metrics --min-images 3

if [[ $KEEP -eq 1 ]]; then
  printf '\nSMOKE PASSED in %d s (runtime %s); container %s left running on %s\n' \
    "$(( $(date +%s) - STARTED ))" "$RUNTIME" "$NAME" "$URL"
  exit 0
fi

step drain "SIGTERM with requests in flight: they are answered, then the process exits 0"
rm -f "$OUT/in-flight"
run_checks drain --in-flight-file "$OUT/in-flight" > "$OUT/drain.log" 2>&1 &
drain_pid=$!
until [[ -e "$OUT/in-flight" ]]; do  # the checks' own deadline ends the wait if nothing shows in flight
  kill -0 "$drain_pid" 2>/dev/null || { wait "$drain_pid" || true; fail "$(tail -n 1 "$OUT/drain.log")" "$OUT/drain.log"; }
  sleep 0.05
done
start=$(date +%s)
pm stop -t 45 "$NAME" > "$LOGS/stop.log" 2>&1 || fail "podman stop failed" "$LOGS/stop.log"
wait "$drain_pid" || fail "$(tail -n 1 "$OUT/drain.log")" "$OUT/drain.log"
cat "$OUT/drain.log"
code=$(pm inspect --format '{{.State.ExitCode}}' "$NAME")
[[ "$code" == "0" ]] || fail "exit code $code after SIGTERM"
ok "exited 0, $(( $(date +%s) - start )) s after SIGTERM"
pm logs "$NAME" > "$LOGS/container.log" 2>&1
if grep -q 'Traceback' "$LOGS/container.log"; then
  grep -B2 -A20 'Traceback' "$LOGS/container.log" > "$OUT/traceback.log"
  fail "a traceback in the container's logs" "$OUT/traceback.log"
fi
ok "no traceback in the logs"

printf '\nSMOKE PASSED in %d s (runtime %s, image %s %s)\n' "$(( $(date +%s) - STARTED ))" "$RUNTIME" "$IMAGE" \
  "$(awk -v s="$size" 'BEGIN {printf "%.0f MB", s / 1e6}')"
