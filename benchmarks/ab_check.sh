#!/usr/bin/env bash
# A one-call A/B of a variant against this tree on the GPU machine, then the variant's checks.
#   VARIANT=<folder> bash benchmarks/ab_check.sh
# VARIANT holds the variant's changed files at their paths relative to the repository root; for a
# commit C on top of this tree's sources: git diff --name-only C~1 C | while read f; do
# mkdir -p v/$(dirname $f); git show C:$f > v/$f; done (the machine's .git is stale, so commits
# do not travel; an untracked folder does).
# 1. This tree builds editable while a copy with the variant's files builds as a wheel (in
#    parallel: ~50 s each on 16 cores), so an A/B costs one build's time.
# 2. AB_CMD (default: benchmarks/fused_fwd_time.py) runs on this tree, then on the variant's wheel,
#    from a directory outside the repository (so `import deft_jax` finds the wheel); logs
#    $OUT/ab_a.log, $OUT/ab_b.log. Twice each, a b a b, so the machine's drift shows.
# 3. The variant's files are copied into this tree, which is rebuilt editable (incremental) and
#    checked with gpu_check.sh's phases CHECK_PHASES (default "test train sanitize fuzz"; with
#    the same variables as gpu_check.sh: TESTS, PYTEST_K, SANITIZE_TOOLS, TRAIN_ARGS, FUZZ_ARGS...),
#    into $OUT/check. Empty CHECK_PHASES skips it.
# Few files come back from a call: $OUT holds the logs and check/'s.
set -o pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$PWD/out}
PY=${PYTHON:-python3}
[[ -d "${VARIANT:-}" ]] || { echo "VARIANT=<folder of the variant's files> is required"; exit 2; }
VARIANT=$(cd "$VARIANT" && pwd)
mkdir -p "$OUT"
SECONDS=0
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n1 | tr -d .)-real
rm -rf /tmp/ab_b /tmp/ab_whl && mkdir -p /tmp/ab_b
cp -r CMakeLists.txt pyproject.toml README.md csrc cmake deft_jax /tmp/ab_b/
cp -r "$VARIANT"/. /tmp/ab_b/
echo "variant's files: $(cd "$VARIANT" && find . -type f | sort | tr '\n' ' ')"
( CUDAARCHS=$arch DEFT_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL=8 "$PY" -m pip wheel --no-build-isolation --no-deps \
    -w /tmp/ab_whl /tmp/ab_b > "$OUT/ab_build_b.log" 2>&1; echo "wheel b rc=$? at ${SECONDS}s" ) &
PHASES=build OUT="$OUT/a_build" bash benchmarks/gpu_check.sh > "$OUT/ab_build_a.log" 2>&1
echo "build a rc=$? at ${SECONDS}s"
wait
ls /tmp/ab_whl/*.whl > /dev/null || { echo "no wheel for b: tail of its build log:"; tail -n 30 "$OUT/ab_build_b.log"; exit 1; }
cmd=${AB_CMD:-"$PY $REPO/benchmarks/fused_fwd_time.py"}
use_a() { "$PY" -m pip install --no-build-isolation --no-deps -q -e "$REPO" > /dev/null 2>&1; }  # no-op rebuild
use_b() { "$PY" -m pip install --no-deps -q --force-reinstall /tmp/ab_whl/*.whl > /dev/null 2>&1; }
for round in 1 2; do
  for side in a b; do
    use_$side || { echo "installing $side failed"; exit 1; }
    echo "== $side, round $round (${SECONDS}s)" | tee -a "$OUT/ab_$side.log"
    (cd /tmp && $cmd) 2>&1 | grep -v -i "warning" | tee -a "$OUT/ab_$side.log"
  done
done
CHECK_PHASES=${CHECK_PHASES-"test train sanitize fuzz"}
if [[ -n "$CHECK_PHASES" ]]; then
  cp -r "$VARIANT"/. "$REPO"/
  PHASES="build $CHECK_PHASES" OUT="$OUT/check" bash benchmarks/gpu_check.sh 2>&1 | grep -v "it/s]" | tail -n 40
fi
echo "ab_check done at ${SECONDS}s"
