#!/usr/bin/env bash
# Download, on the host, every wheel the cpu image installs, so that the image builds with no index
# (`--build-context wheels=DIR --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=/wheels`).
#
# The requirement list is read from pyproject.toml (dependencies, the onnx extra and the build
# backend), so it cannot drift from what the Dockerfile installs. Wheels are chosen for the image's
# Python and for every manylinux tag its glibc (Debian bookworm: 2.36) runs, not only the host's.
#
# Usage: deploy/download_wheels.sh [--python-version X.Y] [--torch-index-url URL] DIR
#   --python-version X.Y    Python of the image's base (default 3.11: Debian bookworm, python:3.11-slim)
#   --torch-index-url URL   where the CPU torch wheel comes from (default https://download.pytorch.org/whl/cpu;
#                           "" to use pip's own indexes and find-links only)
#   DIR                     the wheelhouse; wheels already in it are reused (it is also a find-links)
#
# No CPU torch wheel reachable? Fetch it on any machine that reaches the PyTorch CPU index,
#   pip download --no-deps --only-binary=:all: --python-version 3.11 \
#     --platform manylinux_2_28_x86_64 --index-url https://download.pytorch.org/whl/cpu -d torch-cpu torch==2.13.0
# copy torch-cpu/*.whl into DIR and run this again: the wheel in DIR is used.
set -Eeuo pipefail

usage() { sed -n '2,/^set -E/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
fail() { printf 'FAIL: wheels: %s\n' "$*" >&2; exit 1; }
on_error() { printf 'FAIL: wheels: "%s" exited %d (line %d)\n' "$3" "$1" "$2" >&2; exit "$1"; }
trap 'on_error $? $LINENO "$BASH_COMMAND"' ERR

PY_VERSION=3.11
TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
DIR=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --python-version) [[ $# -ge 2 ]] || { echo "--python-version needs a value" >&2; exit 2; }; PY_VERSION=$2; shift ;;
    --torch-index-url) [[ $# -ge 2 ]] || { echo "--torch-index-url needs a value" >&2; exit 2; }; TORCH_INDEX_URL=$2; shift ;;
    -h | --help) usage; exit 0 ;;
    -*) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    *) [[ -z "$DIR" ]] || { echo "one DIR only (see --help)" >&2; exit 2; }; DIR=$1 ;;
  esac
  shift
done
[[ -n "$DIR" ]] || { echo "DIR is required (see --help)" >&2; exit 2; }
[[ "$PY_VERSION" =~ ^3\.[0-9]+$ ]] || { echo "--python-version takes X.Y, got '$PY_VERSION'" >&2; exit 2; }

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python3 -m pip --version >/dev/null 2>&1 || fail "python3 -m pip is missing (Debian: apt-get install -y python3-pip)"
mkdir -p "$DIR"
LOG="$DIR/.pip-download.log"
REQS="$DIR/.requirements.txt"

python3 - "$REPO_ROOT/pyproject.toml" > "$REQS" <<'PY' || fail "cannot read the requirements from pyproject.toml"
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

pyproject = tomllib.load(open(sys.argv[1], "rb"))
project = pyproject["project"]
# What the Dockerfile's cpu-build stage installs: the project with its onnx extra, built in the image.
for requirement in project["dependencies"] + project["optional-dependencies"]["onnx"]:
    print(requirement)
for requirement in pyproject["build-system"]["requires"]:
    print(requirement)
PY

ARCH=$(uname -m)
# PyPI's Linux x86_64 torch is the CUDA build (several GB with its nvidia-* wheels); the image takes the
# CPU build, whose version carries "+cpu": pin that local version so pip never falls back to the other.
# Other architectures' PyPI wheels are CPU-only.
torch_pin=$(grep -m 1 '^torch==' "$REQS" || true)
if [[ "$ARCH" == x86_64 && -n "$torch_pin" && "$torch_pin" != *+* ]]; then
  sed -i "s/^${torch_pin}\$/${torch_pin}+cpu/" "$REQS"
  torch_pin="$torch_pin+cpu"
fi
platforms=(--platform "manylinux2014_$ARCH" --platform "linux_$ARCH")
for minor in $(seq 17 36); do platforms+=(--platform "manylinux_2_${minor}_$ARCH"); done

index_args=()
if [[ -n "$TORCH_INDEX_URL" ]]; then
  # An index that cannot be reached costs pip retries on every requirement: check it once.
  if curl -fsS -o /dev/null -m 10 "${TORCH_INDEX_URL%/}/torch/" 2>/dev/null; then
    index_args=(--extra-index-url "$TORCH_INDEX_URL")
  else
    echo "note $TORCH_INDEX_URL is not reachable: torch must come from $DIR, pip's own indexes or find-links"
  fi
fi

torch_help() {
  printf 'No CPU torch wheel (%s) reachable. Download it on a machine that reaches the PyTorch CPU index:\n' "$torch_pin"
  printf '  pip download --no-deps --only-binary=:all: --python-version %s --platform manylinux_2_28_%s \\\n' "$PY_VERSION" "$ARCH"
  printf '    --index-url https://download.pytorch.org/whl/cpu -d torch-cpu "%s"\n' "$torch_pin"
  printf 'then copy torch-cpu/*.whl into %s and run this again (or pass --torch-index-url a mirror of that index).\n' "$DIR"
}

if ! python3 -m pip download --disable-pip-version-check -d "$DIR" --find-links "$DIR" "${index_args[@]}" \
  --only-binary=:all: --implementation cp --python-version "$PY_VERSION" "${platforms[@]}" \
  -r "$REQS" > "$LOG" 2>&1; then
  printf 'FAIL: wheels: pip download failed (log: %s)\n--- last 15 lines\n' "$LOG" >&2
  tail -n 15 "$LOG" >&2
  if grep -q "No matching distribution found for torch" "$LOG"; then torch_help >&2; fi
  exit 1
fi
torch_wheel=$(find "$DIR" -maxdepth 1 -name "torch-*-cp${PY_VERSION/./}-*.whl" -printf '%f\n' | sort | tail -n 1)
echo "ok   $(find "$DIR" -maxdepth 1 -name '*.whl' | wc -l) wheels in $DIR, $(du -sh "$DIR" | cut -f1), torch: $torch_wheel"
