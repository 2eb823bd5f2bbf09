#!/usr/bin/env bash
# Does the bf16 training regression test fail on the code from before the workspace fix?
# Builds an old source tree (default .old: `mkdir .old && git archive eb2e2d0 | tar -x -C .old`,
# carried to the GPU machine; it is git-ignored through .git/info/exclude) into /tmp/old, then,
# against that build: this tree's tests/test_gpu_training.py (command buffers on, then off) and
# the issue's reproducer (the old tree's benchmarks/train.py, ResNet-18 width 64, 64 px, batch 64,
# bf16, 8 steps). The editable install of this tree is removed first (its import hook would win
# over PYTHONPATH); run gpu_check.sh's build phase again afterwards. Logs: $OUT/old_tree.log.
# Found (2026-12-06): the old tree passed the test and followed the reference in the reproducer on
# an H200 and on an H100 (the divergence was reported on an H100): benchmarks/RESULTS.md.
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
OLD=${OLD_TREE:-.old}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
log="$OUT/old_tree.log"
[[ -f "$OLD/CMakeLists.txt" ]] || { echo "no source tree at $OLD (see the header)"; exit 2; }
{
  nvidia-smi --query-gpu=name --format=csv,noheader
  "$PY" -m pip uninstall -y -q deft_jax
  echo "== build $OLD ($(date -u +%T))"
  DEFT_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$PY" -m pip install -q --no-build-isolation --no-deps \
      --target /tmp/old "./$OLD" || exit 1
  mkdir -p /tmp/old_tests
  cp tests/test_gpu_training.py tests/helpers.py tests/conftest.py /tmp/old_tests/
  for cb in on off; do
    flags=""; [[ $cb == off ]] && flags="--xla_gpu_enable_command_buffer="
    echo "== tests/test_gpu_training.py on $OLD, command buffers $cb ($(date -u +%T))"
    (cd /tmp/old_tests && XLA_FLAGS=$flags PYTHONPATH=/tmp/old timeout 300 "$PY" -m pytest -q -rf \
        -p no:cacheprovider test_gpu_training.py 2>&1 | grep -E "passed|failed|FAILED|native losses")
  done
  echo "== the issue's reproducer on $OLD ($(date -u +%T))"
  (cd "$OLD" && PYTHONPATH=/tmp/old timeout 300 "$PY" benchmarks/train.py --arch resnet18 --width 64 \
      --batch 64 --image-size 64 --channels 3 --dtype bfloat16 --steps 8 --eval-every 1000 \
      --num-train 512 --num-test 64 --models deform,deform_xla 2>&1 | grep -v "it/s" | tail -n 8)
} 2>&1 | tee "$log"
