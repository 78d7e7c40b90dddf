#!/usr/bin/env bash
# The GPU checks in one prepared run, for a session lent a GPU machine by the `device` tool (about
# 15 minutes of device time in all, start-up included; this script stays under 9.5 minutes):
#
#   1. tests/test_cuda.py: a hybrid filled on the GPU, hot-swaps into GPU tensors and the probe
#      command on the GPU, each against the same on the CPU               (at most 2 minutes)
#   2. python bench/scale.py --scale 0.25 --device cuda: the 0.94 GB OLMoE-shaped pair end to end,
#      materialise, hot-swaps against a device-to-device copy, probes, routing (at most 5 minutes)
#   3. python bench/probe.py --device cuda: batched MC scoring against a naive loop, and a hot-swap
#      against a plain copy                                                  (at most 2 minutes)
#
# Each step's output goes to $OUT (what the device tool brings back) and to the terminal. Before the
# call, on the developer machine: `bash bench/device_wheels.sh` (the packages that machine lacks,
# into .whl/), then run this with .whl carried:
#     device run: command "bash bench/device_check.sh", carry [".whl"], timeout_s 590
# DEVICE=cpu runs the same steps on the CPU with this machine's own packages (a dry run of this
# script, the GPU tests run CPU against CPU); STEPS="tests scale probe" picks steps.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device-check}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-tests scale probe}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=$(command -v python3)

if [ "$DEVICE" != cpu ] && compgen -G ".whl/*.whl" >/dev/null; then
  # what the image lacks or has too old (bench/device_wheels.sh), ahead of its own packages
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "device_check: the carried wheels did not install" | tee "$OUT/failed.txt"; exit 1; }
  export PYTHONPATH="$PWD:/tmp/site"
else
  export PYTHONPATH="$PWD"
fi

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi"
  "$PY" - <<'EOF'
import platform, torch, transformers
print("python", platform.python_version(), "torch", torch.__version__, "transformers", transformers.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
print("cpus", __import__("os").cpu_count())
EOF
} 2>&1 | tee "$OUT/env.txt"

step() {  # step NAME SECONDS COMMAND...: run one step under a time limit, its output kept
  local name=$1 limit=$2
  shift 2
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  echo "== $name (at most ${limit} s): $*" | tee "$OUT/$name.txt"
  local started=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - started)) s" | tee -a "$OUT/$name.txt"
}

if [ "$DEVICE" = cpu ]; then export MOE_SURGEON_TEST_GPU=cpu; fi
step tests 120 "$PY" -m pytest -v -p no:cacheprovider -n 0 tests/test_cuda.py
step scale 300 "$PY" bench/scale.py --scale 0.25 --device "$DEVICE" --keep-cache --work /tmp/device-scale
step probe 120 "$PY" bench/probe.py --device "$DEVICE"
