#!/usr/bin/env bash
# GPU check for a bare single-GPU machine: a CUDA build of PyTorch, no package index.
#
#   bench/gpu_check.sh              # from anywhere; planned at ~4 minutes on one H100, limits add up to 5
#   bench/gpu_check.sh --dry-run    # the same script on a CPU machine: everything but the CUDA parts
#
# 0. Smoke (about 10 s, bench/gpu_smoke.py): a bf16 matrix product, torch.compile of a tiny function,
#    one flex attention call. A broken toolchain stops the check here with one line.
# 1. Installs the project's missing dependencies from wheels made beforehand on a machine with a
#    package index (docs/gpu.md, "GPU check on one machine"; into a fresh folder, nothing system-wide):
#      pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d wheels \
#        megatron-core==0.16.1 einops==0.8.2 zstandard==0.25.0 lz4==4.4.5 packaging==26.4
#    then imports what the tests and the benchmark use.
# 2. Runs the GPU tests (tests/test_gpu.py); stopped at its limit with SIGINT, so that pytest still
#    writes the results of the tests that finished.
# 3. Runs the throughput benchmark (bench/bench_train_gpu.py: ~1B SOLO proxy, 32K packs holding a
#    long windowed document, flex vs the per-document path); each backend under its own limit, the
#    JSON written after each.
# Writes $OUT/gpu_check.json in every case (environment, smoke, install, test counts, benchmark
# figures; what did not run and why), plus smoke.json, gpu_tests.xml/.log and gpu_bench.json/.log.
# Exit code 0 only if every step passed. With --dry-run (no GPU): the smoke step only imports, the
# GPU tests are collected and reported skipped, the benchmark runs its tiny CPU variant.
#
#   OUT      output folder (gpu_check_out)     WHEELS  folder of the wheels (wheels)
#   DEPS     where the wheels are installed (a new folder under /tmp)
#   PYTHON   interpreter with torch (python3)
#   SMOKE_TIMEOUT / TEST_TIMEOUT / LEG_TIMEOUT  seconds (45 / 110 / 65 per benchmark backend)
set -uo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
DRY_RUN=0
case "${1:-}" in
  --dry-run) DRY_RUN=1 ;;
  "") ;;
  *) echo "usage: bench/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-gpu_check_out}"
WHEELS="${WHEELS:-wheels}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
rm -f "$OUT"/{gpu_check.json,smoke.json,gpu_tests.xml,gpu_tests.log,gpu_bench.json,gpu_bench.log}  # this script's own
START=$(date +%s)
log() { echo "[gpu_check $(($(date +%s) - START))s] $*"; }

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export CUDA_DEVICE_MAX_CONNECTIONS=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}" PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
# The patch count changes every micro-batch: as in the launchers.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"

# What each step left, for the summary (written on every exit, early ones included).
STAGE="interpreter" INSTALL="not run" INSTALLED_INTO="" TESTS_RC="" BENCH_RC="" SMOKE_RC=""
summary() {
  local rc=$?
  "$PYTHON" - "$OUT" "$DRY_RUN" "$STAGE" "$INSTALL" "$INSTALLED_INTO" "$TESTS_RC" "$BENCH_RC" "$SMOKE_RC" \
    "$(($(date +%s) - START))" "$rc" <<'EOF' || echo "gpu_check: could not write $OUT/gpu_check.json (see above)"
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path

out = Path(sys.argv[1])
dry, stage, install, into, tests_rc, bench_rc, smoke_rc, seconds, rc = sys.argv[2:]
dry = dry == "1"
skipped = []


def read_json(name):
    path = out / name
    return json.loads(path.read_text()) if path.exists() else None


try:
    from megatron_patch.preflight import attention_environment

    environment = attention_environment()
except Exception as exc:  # no torch, or the project does not import: say so, write the rest
    environment = {"error": f"{type(exc).__name__}: {exc}"}
smoke = read_json("smoke.json") or {"status": "not run"}
if dry:
    skipped.append("smoke: matmul, compile and flex need CUDA (dry run: imports only)")
tests = {"rc": int(tests_rc)} if tests_rc else {"status": "not run"}
if tests_rc in ("124", "137"):
    tests["status"] = "stopped at its time limit; counts are of the tests that finished"
if (out / "gpu_tests.xml").exists():
    suite = ET.parse(out / "gpu_tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
    if dry:
        skipped.append(f"GPU tests: {tests['tests']} collected, {tests['skipped']} skipped (no CUDA)")
benchmark = read_json("gpu_bench.json") or {"status": "not run"}
if bench_rc:
    benchmark["rc"] = int(bench_rc)
if dry:
    skipped.append("benchmark: flex and the 1B proxy need CUDA (dry run: the tiny CPU variant, local path)")
report = dict(
    mode="dry-run" if dry else "gpu", ok=rc == "0", stopped_at=None if rc == "0" else stage, seconds=int(seconds),
    environment=environment, smoke=smoke, install=dict(status=install, into=into or None), tests=tests,
    benchmark=benchmark, skipped=skipped,
)
(out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
print(json.dumps(report, indent=2))
EOF
  log "done (exit $rc): $OUT/gpu_check.json"
}
trap summary EXIT

if ! "$PYTHON" - "$DRY_RUN" <<'EOF'
import sys
try:
    import torch
except ImportError as exc:
    sys.exit(f"gpu_check: {sys.executable} has no PyTorch ({exc}); set PYTHON to the interpreter that has it")
if sys.argv[1] == "1":
    print(f"torch {torch.__version__}, dry run (CUDA parts skipped)")
    sys.exit(0)
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA GPU (CUDA build: {torch.version.cuda}); "
             "on a CPU machine use --dry-run")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {torch.cuda.get_device_name()}, "
      f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
EOF
then exit 2; fi

STAGE="install"
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if ((${#wheels[@]})); then
  DEPS="${DEPS:-$(mktemp -d /tmp/solo_gpu_deps.XXXXXX)}"
  log "installing ${#wheels[@]} wheels from $WHEELS into $DEPS"
  if "$PYTHON" -m pip --version >/dev/null 2>&1; then
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --target "$DEPS" "${wheels[@]}" \
      || { INSTALL="failed: pip could not install the wheels in $WHEELS (see above)"; exit 2; }
  else  # no pip: a wheel is a zip archive laid out for site-packages
    for w in "${wheels[@]}"; do "$PYTHON" -m zipfile -e "$w" "$DEPS" || { INSTALL="failed ($w)"; exit 2; }; done
  fi
  export PYTHONPATH="$REPO:$DEPS${PYTHONPATH#"$REPO"}"
  INSTALL="installed ${#wheels[@]} wheels" INSTALLED_INTO="$DEPS"
else
  INSTALL="skipped: no wheels in $WHEELS/"
fi

STAGE="imports"
if ! "$PYTHON" - "$INSTALLED_INTO" <<'EOF'
import sys
try:
    import einops, lz4, zstandard  # noqa: F401
    import megatron.core

    import megatron_patch.data, megatron_patch.model, megatron_patch.preflight, megatron_patch.train  # noqa: F401
except ImportError as exc:
    sys.exit(f"gpu_check: {exc}; make the wheels with the pip download command at the top of this script "
             "(on a machine with a package index) and put them in WHEELS")
into = sys.argv[1]
if into and not megatron.core.__file__.startswith(into):
    sys.exit(f"gpu_check: megatron.core imports from {megatron.core.__file__}, not from the wheels in {into}")
print(f"imports: megatron-core {megatron.core.__version__} from {megatron.core.__file__}")
EOF
then exit 2; fi

STAGE="smoke"
log "smoke"
SMOKE_ARGS=(--out "$OUT/smoke.json")
((DRY_RUN)) && SMOKE_ARGS+=(--dry-run)
timeout -s INT -k 10 "${SMOKE_TIMEOUT:-45}" "$PYTHON" bench/gpu_smoke.py "${SMOKE_ARGS[@]}"
SMOKE_RC=$?
if ((SMOKE_RC)); then
  ((SMOKE_RC == 124)) && echo "gpu_check: the smoke step did not finish within ${SMOKE_TIMEOUT:-45} s"
  exit 3
fi

STAGE="tests"
log "GPU tests"
# SIGINT, not timeout's default SIGTERM: pytest then stops like on Ctrl-C and still writes its XML.
timeout -s INT -k 30 "${TEST_TIMEOUT:-110}" "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_gpu.py \
  --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log"
TESTS_RC=${PIPESTATUS[0]}

STAGE="benchmark"
log "throughput benchmark"
BENCH_ARGS=(--out "$OUT/gpu_bench.json" --leg-timeout "${LEG_TIMEOUT:-65}")
((DRY_RUN)) && BENCH_ARGS+=(--tiny --backends local --steps 1 --warmup 0 --micro-batches 1 --packs 1)
# Each backend has its own limit inside; this one only guards against a hang between them.
timeout -s INT -k 10 $((2 * ${LEG_TIMEOUT:-65} + 60)) "$PYTHON" bench/bench_train_gpu.py "${BENCH_ARGS[@]}" 2>&1 \
  | tee "$OUT/gpu_bench.log"
BENCH_RC=${PIPESTATUS[0]}

STAGE="finished"
[[ "$TESTS_RC" == 0 && "$BENCH_RC" == 0 ]]
