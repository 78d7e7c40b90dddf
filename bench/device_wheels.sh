#!/usr/bin/env bash
# Fetch, on the developer machine, the wheels bench/device_check.sh installs on a lent GPU machine.
#
# That machine reaches no package index. Its image has torch, accelerate, safetensors, tokenizers,
# huggingface-hub, numpy, rich, pygments, pyyaml, pillow, xxhash and pytest (the device tool's
# KINDS.md lists them), but transformers 5.17 where moe-surgeon needs 5.24, and neither textual nor
# jsonschema. Python there is 3.12 on x86-64, so the one compiled wheel (rpds-py) is fetched for it.
# The wheels land in .whl/ (ignored by git), which the device call carries: about 14 MB.
#
# Run: bash bench/device_wheels.sh        (then see docs/benchmarks.md, "On a lent GPU")
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl
mkdir -p .whl
# Each pinned to what this checkout's own environment resolved (pip show NAME here), so the GPU
# machine runs what CI tested.
version() { python -c "from importlib.metadata import version; print(version('$1'))"; }
wanted=(transformers textual rich platformdirs markdown-it-py mdurl mdit-py-plugins linkify-it-py
        jsonschema jsonschema-specifications referencing rpds-py)
pins=()
for name in "${wanted[@]}"; do
  pins+=("$name==$(version "$name")")
done
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d .whl "${pins[@]}"
ls -1 .whl
du -sh .whl
