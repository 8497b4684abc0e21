#!/usr/bin/env bash
# GPU check for a bare single-GPU machine: a CUDA build of PyTorch, no package index.
#
#   bench/gpu_check.sh            # from anywhere; within 8 minutes on one H100/H200 (timeouts below)
#
# 1. Installs the project's missing dependencies from wheels made beforehand on a machine with a
#    package index (README "GPU readiness"; into $DEPS, nothing system-wide):
#      pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d wheels \
#        megatron-core==0.16.1 einops==0.8.2 zstandard==0.25.0 lz4==4.4.5 packaging==26.4
# 2. Runs the GPU tests (tests/test_gpu.py).
# 3. Runs the throughput benchmark (bench/bench_train_gpu.py: ~1B SOLO proxy, 32K packs, flex vs
#    the per-document path).
# Writes $OUT/gpu_check.json (environment, test counts, benchmark figures), plus gpu_tests.xml and
# gpu_bench.json beside it. Exit code 0 only if every test passed and the benchmark ran.
#
#   OUT      output folder (gpu_check_out)     WHEELS  folder of the wheels (wheels)
#   DEPS     where the wheels are installed (.gpu_deps)     PYTHON  interpreter with CUDA torch (python3)
#   TEST_TIMEOUT / BENCH_TIMEOUT  seconds (270 / 210: the whole check stays within 8 minutes)
set -uo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-gpu_check_out}"
WHEELS="${WHEELS:-wheels}"
DEPS="${DEPS:-$REPO/.gpu_deps}"
mkdir -p "$OUT"
START=$(date +%s)
log() { echo "[gpu_check $(($(date +%s) - START))s] $*"; }

export PYTHONPATH="$REPO:$DEPS${PYTHONPATH:+:$PYTHONPATH}"
export CUDA_DEVICE_MAX_CONNECTIONS=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}" PYTHONWARNINGS=ignore

"$PYTHON" - <<'EOF' || { echo "gpu_check: this interpreter has no CUDA build of PyTorch or sees no GPU"; exit 2; }
import torch
assert torch.cuda.is_available(), "no CUDA device visible"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {torch.cuda.get_device_name()}, "
      f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
EOF

if ! "$PYTHON" -c "import megatron.core, einops, zstandard, lz4" 2>/dev/null; then
  shopt -s nullglob
  wheels=("$WHEELS"/*.whl)
  if ((${#wheels[@]} == 0)); then
    echo "gpu_check: megatron-core (and einops, zstandard, lz4) are missing and $WHEELS/ holds no wheels;"
    echo "  make them on a machine with a package index with the pip download command at the top of this script."
    exit 2
  fi
  log "installing ${#wheels[@]} wheels from $WHEELS into $DEPS"
  mkdir -p "$DEPS"
  if ! "$PYTHON" -m pip install --quiet --no-index --no-deps --target "$DEPS" "${wheels[@]}"; then
    # No pip: a wheel is a zip archive laid out for site-packages.
    for w in "${wheels[@]}"; do "$PYTHON" -m zipfile -e "$w" "$DEPS" || exit 2; done
  fi
fi

log "GPU tests"
timeout "${TEST_TIMEOUT:-270}" "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_gpu.py \
  --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log"
TESTS_RC=${PIPESTATUS[0]}

log "throughput benchmark"
timeout "${BENCH_TIMEOUT:-210}" "$PYTHON" bench/bench_train_gpu.py --out "$OUT/gpu_bench.json" 2>&1 | tee "$OUT/gpu_bench.log"
BENCH_RC=${PIPESTATUS[0]}

"$PYTHON" - "$OUT" "$TESTS_RC" "$BENCH_RC" "$(($(date +%s) - START))" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

import torch

from megatron_patch.preflight import attention_environment

out, tests_rc, bench_rc, seconds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
tests = {"rc": tests_rc}
if (out / "gpu_tests.xml").exists():
    suite = ET.parse(out / "gpu_tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
bench = json.loads((out / "gpu_bench.json").read_text()) if (out / "gpu_bench.json").exists() else None
report = dict(environment=attention_environment(), seconds=seconds, tests=tests, bench_rc=bench_rc, benchmark=bench)
(out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
print(json.dumps(report, indent=2))
EOF
log "done: tests rc=$TESTS_RC, benchmark rc=$BENCH_RC; $OUT/gpu_check.json"
[[ "$TESTS_RC" == 0 && "$BENCH_RC" == 0 ]]
