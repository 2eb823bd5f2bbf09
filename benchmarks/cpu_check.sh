#!/usr/bin/env bash
# The CPU route's benchmarks on a machine with more cores (e.g. the GPU machine's 16 CPU cores):
# build the CPU module alone against the preinstalled jax, then, with JAX on the CPU, run
# cpu_parts.py (where the time goes) and bench_layers.py (the headline table) once per CPU set.
#   CPU_SETS   taskset CPU lists, "all" = every CPU (default "0-1 all": 2 cores, then all of them).
#              JAX sizes its intra-op thread pool (which the native handlers use) from the CPUs the
#              process may run on; torch gets the same number of threads.
#   PHASES     any of "build parts bench" (default: all three)
#   PARTS_ARGS, BENCH_ARGS   extra arguments (e.g. PARTS_ARGS="--shapes S1,S3 --chunks 0,1,2")
# The CPU fused forward needs OpenBLAS (the scipy-openblas32 wheel): a machine without PyPI (the GPU
# machine) gets it from .whl/ (git-ignored; `pip download --no-deps scipy-openblas32 -d .whl` here,
# then carry ".whl"), which the build phase installs; without it the bench has no "fused us".
# On the GPU machine pass DEFT_GIT_COMMIT=<local HEAD> (its copy's .git is stale), as for gpu_check.sh.
# Output in $OUT (at most 8 files for the device tool): cpu_build.log, parts_<n>cpu.log,
# bench_<n>cpu.log and bench_<n>cpu.json (results.json; --markdown turns it into the table).
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
PHASES=${PHASES:-"build parts bench"}
CPU_SETS=${CPU_SETS:-"0-1 all"}
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=cpu
status=0
has() { [[ " $PHASES " == *" $1 "* ]]; }

if has build; then
  echo "== build ($(date -u +%T))"
  if ls .whl/scipy_openblas32-*.whl > /dev/null 2>&1; then
    "$PY" -m pip install --no-deps -q .whl/scipy_openblas32-*.whl > "$OUT/cpu_build.log" 2>&1 \
        || echo "could not install .whl/scipy_openblas32 (see cpu_build.log)"
  fi
  DEFT_CUDA=OFF CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$PY" -m pip install --no-build-isolation --no-deps \
      -e . >> "$OUT/cpu_build.log" 2>&1 || { echo "BUILD FAILED"; tail -n 40 "$OUT/cpu_build.log"; exit 1; }
  "$PY" -c "import jax, deft_jax; print('jax', jax.__version__, jax.devices(), 'kernels', deft_jax._ffi._deft_cpu.cpu_isa(), 'fused forward BLAS:', deft_jax._ffi.load_blas() or 'OpenBLAS ' + deft_jax._ffi.blas_core())" \
      2>&1 | tee -a "$OUT/cpu_build.log"
  lscpu | grep -E "Model name|^CPU\(s\)|Thread|L3" | tee -a "$OUT/cpu_build.log"
fi
cpus_of() { "$@" "$PY" -c "import os; print(len(os.sched_getaffinity(0)))"; }
for phase in bench parts; do  # the headline table on every CPU set first
  has $phase || continue
  for set in $CPU_SETS; do
    pin=()
    [[ "$set" != all ]] && pin=(taskset -c "$set")
    n=$(cpus_of "${pin[@]}")
    echo "== $phase on $n CPUs ($(date -u +%T))"
    if [[ $phase == bench ]]; then
      "${pin[@]}" "$PY" benchmarks/bench_layers.py ${BENCH_ARGS:-} --out "/tmp/bench_${n}cpu" 2>&1 \
          | grep -v "bench:" | tee "$OUT/bench_${n}cpu.log" | tail -n 30
      [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
      cp "/tmp/bench_${n}cpu/results.json" "$OUT/bench_${n}cpu.json" 2>/dev/null
    else
      "${pin[@]}" "$PY" benchmarks/cpu_parts.py ${PARTS_ARGS:-} 2>&1 | tee "$OUT/parts_${n}cpu.log" | tail -n 20
      [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
    fi
  done
done
exit $status
