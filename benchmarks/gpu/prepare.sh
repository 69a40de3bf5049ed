#!/usr/bin/env bash
# Download the wheels the GPU machine lacks, for its CPython 3.12 on manylinux x86-64, into
# benchmarks/gpu/wheels/ (ignored by git; carried to the device with carry=["benchmarks/gpu/wheels"]).
#
# The device has torch, numpy, safetensors, huggingface_hub, accelerate, pyyaml, tabulate, tqdm,
# matplotlib, pyarrow, einops and sentencepiece, but not moshi, soundfile or soxr (nor cffi,
# which soundfile needs). gpu_check imports nothing else: datasets (Hub sources only), sphn,
# aiohttp, bitsandbytes and sounddevice (moshi's server and client) are left out on purpose.
# Versions are the ones this project is tested with; --no-deps, so nothing else comes along.
#
#   bash benchmarks/gpu/prepare.sh                 # download (needs the package registry)
#   bash benchmarks/gpu/prepare.sh --dry-run       # print what it would download, touch nothing
#   bash benchmarks/gpu/prepare.sh --find-links D  # take the wheels from folder D, no network
#   bash benchmarks/gpu/prepare.sh --dest D        # into D instead of benchmarks/gpu/wheels
#
# It writes nothing outside the destination folder: no pip cache, temporary files inside it.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python3}"
DEST="$HERE/wheels"
DRY=0
FIND_LINKS=""
LIMIT_MIB=50  # the device takes 64 MiB in all; the repository's tracked files are ~10 MB

WHEELS=(
  "moshi==0.2.13"      # py3-none-any
  "soundfile==0.14.0"  # bundles libsndfile
  "soxr==1.1.0"        # cp312 manylinux
  "cffi==2.1.1"        # soundfile's binding; cp312 manylinux
  "pycparser==3.12"    # cffi's parser; py3-none-any
)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
           manylinux_2_5_x86_64 manylinux1_x86_64)

while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --dest) DEST="$2"; shift ;;
    --find-links) FIND_LINKS="$2"; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "prepare.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

ARGS=(-m pip download --no-deps --only-binary=:all: --no-cache-dir --disable-pip-version-check
      --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none)
for p in "${PLATFORMS[@]}"; do ARGS+=(--platform "$p"); done
ARGS+=(--platform any)
if [ -n "$FIND_LINKS" ]; then  # only that folder: no index, nor links from the environment
  ARGS+=(--no-index --find-links "$FIND_LINKS")
  unset PIP_FIND_LINKS PIP_INDEX_URL PIP_EXTRA_INDEX_URL
fi

if [ "$DRY" = 1 ]; then
  echo "would run: $PY ${ARGS[*]} -d $DEST ${WHEELS[*]%%#*}"
  exit 0
fi

mkdir -p "$DEST"
TMP="$DEST/.tmp"
mkdir -p "$TMP"
trap 'rm -rf "$TMP"' EXIT
# pip's cache, config and temporary files stay inside $DEST, and so does whatever its helpers
# write to the home folder (pip asks rustc for its version, and rustup writes ~/.rustup)
HOME="$TMP" TMPDIR="$TMP" PIP_CONFIG_FILE=/dev/null XDG_CACHE_HOME="$TMP" PIP_NO_CACHE_DIR=1 \
  "$PY" "${ARGS[@]}" -d "$DEST" "${WHEELS[@]}"

# Keep exactly the pinned wheels (an older download of another version would be installed too).
for whl in "$DEST"/*.whl; do
  name="$(basename "$whl" | cut -d- -f1-2 | tr 'A-Z_' 'a-z-')"
  keep=0
  for w in "${WHEELS[@]}"; do
    pin="$(echo "$w" | tr 'A-Z_' 'a-z-' | sed 's/==/-/')"
    [ "$name" = "$pin" ] && keep=1
  done
  if [ "$keep" = 0 ]; then echo "removing $(basename "$whl") (not pinned)"; rm -f "$whl"; fi
done
count=$(ls "$DEST"/*.whl | wc -l)
if [ "$count" -ne "${#WHEELS[@]}" ]; then
  echo "prepare.sh: expected ${#WHEELS[@]} wheels in $DEST, found $count" >&2
  exit 1
fi
bytes=$(cat "$DEST"/*.whl | wc -c)
ls -l "$DEST"/*.whl
echo "prepare.sh: ${count} wheels, $((bytes / 1024)) KiB in $DEST"
if [ "$bytes" -gt $((LIMIT_MIB * 1024 * 1024)) ]; then
  echo "prepare.sh: over ${LIMIT_MIB} MiB: with the repository they would not fit the device's 64 MiB" >&2
  exit 1
fi
