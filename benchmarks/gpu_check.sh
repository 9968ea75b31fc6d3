#!/usr/bin/env bash
# Every GPU check of the project in one go, on a CUDA machine with torch and triton installed:
# build the package, run the GPU tests, then the GPU report. Logs and the report go to OUTDIR.
#
#   bash benchmarks/gpu_check.sh [OUTDIR]      # default OUTDIR: gpu_check_out
#
# GPU_TESTS_TIMEOUT (seconds, default 300: flex_attention compiles on first use) bounds the test run so
# the report always gets its turn;
# REPORT_ARGS is passed to gpu_report.py (e.g. "--only gpu_sampling").
set -uo pipefail
out=${1:-gpu_check_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$out/device.txt"
"$py" -m pip install -q --no-build-isolation --no-deps -e . > "$out/install.log" 2>&1 \
    || { tail -30 "$out/install.log"; exit 1; }
"$py" -c "import arpo_fast, arpo_fast._C, torch, triton; print('arpo_fast', arpo_fast.__version__, \
'torch', torch.__version__, 'triton', triton.__version__)" 2>&1 | tee -a "$out/device.txt"
parallel=()
"$py" -c "import xdist" 2>/dev/null && parallel=(-n 4)
timeout "${GPU_TESTS_TIMEOUT:-300}" "$py" -m pytest -m gpu -q -rfEs "${parallel[@]}" tests 2>&1 \
    | tee "$out/gpu_tests.log"
echo "gpu tests exit status: ${PIPESTATUS[0]}" | tee -a "$out/gpu_tests.log"
"$py" benchmarks/gpu_report.py --out "$out/report.md" ${REPORT_ARGS:-} > "$out/report.log" 2>&1
status=$?
tail -n 80 "$out/report.log"
exit $status
