#!/usr/bin/env bash
# Run the prepared GPU check on a bare device machine in one call (benchmarks/RESULTS.md has the
# exact call): install the wheels prepare.sh downloaded (benchmarks/gpu/wheels, carried) into a
# private folder unless the Python already imports them, put the repository on the path, and run
# benchmarks/gpu_check.py with its report and log under $OUT (else benchmarks/gpu/out).
# Extra arguments go to gpu_check.py, e.g. `bash benchmarks/gpu/run.sh --device cpu --quick`; it is
# stopped after GPU_CHECK_TIMEOUT seconds (default 450) if its own --budget (330 s) did not end it.
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PY="${PYTHON:-python3}"
DEST="${OUT:-$HERE/out}"
WHEELS="${GPU_CHECK_WHEELS:-$HERE/wheels}"  # another folder: e.g. the same versions built for another Python
SITE="${GPU_CHECK_SITE:-${TMPDIR:-/tmp}/ttt_bench_gpu_site}"
mkdir -p "$DEST"
LOG="$DEST/gpu_check.log"

{
  echo "run.sh: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $("$PY" --version 2>&1), output in $DEST"
  if ! "$PY" -c "import moshi, soundfile, soxr" 2>/dev/null; then
    if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
      echo "run.sh: moshi, soundfile or soxr is missing and benchmarks/gpu/wheels has no wheels:" \
           "run benchmarks/gpu/prepare.sh where the package registry is reachable, and carry the folder" >&2
      exit 3
    fi
    echo "run.sh: installing $(ls "$WHEELS"/*.whl | xargs -n1 basename | tr '\n' ' ')into $SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
      --upgrade --target "$SITE" "$WHEELS"/*.whl || exit 3
    export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  else
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  fi
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  # gpu_check keeps to its --budget between Python statements; a kernel that hangs is stopped here
  # (the report, rewritten after every section, keeps what finished)
  cd "$ROOT" && timeout -k 10 "${GPU_CHECK_TIMEOUT:-450}" "$PY" benchmarks/gpu_check.py --out "$DEST" "$@"
} 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
