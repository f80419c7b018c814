#!/usr/bin/env bash
# The GPU checks as one prepared command, for a machine lent for minutes (one H100 or H200, a CUDA
# torch, no network): what the device is, the CUDA extension built, the `gpu` tests, then the GPU
# benchmarks. Each stage has its own time limit, so a stuck one cannot eat the lease; a failed stage
# is reported and the next one runs; the exit status is the first failure's. Logs go to $OUT (./gpu-out
# by default), one per stage, with summary.txt (each stage's command, exit status and seconds) and
# results.tar.gz (the bench/results files the benchmarks wrote).
#
#   bash bench/gpu_check.sh                                  # every stage (their limits add up to 17.5 minutes)
#   STAGES="device build test" bash bench/gpu_check.sh       # a device call runs at most 10 minutes: this first,
#   STAGES="ops sparse scaling" bash bench/gpu_check.sh      # then this on the warm machine (its build is kept)
#   PYTHON=.venv/bin/python STAGES=device bash bench/gpu_check.sh   # the plumbing, on any machine
#
# faiss (the faiss-* indexes only) is optional: a cp312 faiss-cpu wheel in .whl/ is installed first
# (python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
#  --platform manylinux_2_28_x86_64 -d .whl faiss-cpu==1.15.0, with .whl/ in .git/info/exclude).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
PYTHON=${PYTHON:-python3}
KNOWN="device build test ops sparse scaling"
STAGES=${STAGES:-$KNOWN}
for name in $STAGES; do
  case " $KNOWN " in *" $name "*) ;; *) echo "gpu_check: unknown stage '$name' (stages: $KNOWN)" >&2; exit 2 ;; esac
done
mkdir -p "$OUT"
: > "$OUT/summary.txt"
started=$(mktemp)  # the benchmarks' results are the bench/results files newer than this
status=0

# stage NAME SECONDS COMMAND...: runs COMMAND when STAGES names NAME, its output in $OUT/NAME.log.
stage() {
  local name=$1 limit=$2
  shift 2
  case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local note=""
  [ "$rc" -eq 124 ] && note=" (stopped at its limit of ${limit} s)"
  echo "$name: exit $rc in $((SECONDS - start)) s$note: $*" | tee -a "$OUT/summary.txt"
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
}

if compgen -G ".whl/faiss_cpu-*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/faiss_cpu-*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

stage device 60 "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'devices', [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] or 'none')"
# The package editable, as make test installs it, and its extension with the CUDA kernels
# (SPARSEMEM_BUILD_EXT=1: a failed build is an error, not a torch-only install).
stage build 300 env SPARSEMEM_BUILD_EXT=1 SPARSEMEM_CUDA_ARCHS="${SPARSEMEM_CUDA_ARCHS:-9.0}" MAX_JOBS="$(nproc)" \
  "$PYTHON" -m pip install --no-deps --no-build-isolation -e .
stage test 240 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider
stage ops 120 "$PYTHON" -m bench.ops.bench_ops --device cuda
stage sparse 90 "$PYTHON" -m bench.ops.bench_sparse --device cuda
stage scaling 240 "$PYTHON" -m bench.scaling --device cuda --time-budget 200

changed=$(find bench/results -type f -newer "$started")
if [ -n "$changed" ]; then
  # shellcheck disable=SC2086  # one path a word: bench/results holds no spaces
  tar czf "$OUT/results.tar.gz" $changed
fi
rm -f "$started"
echo "gpu_check: exit $status" | tee -a "$OUT/summary.txt"
exit "$status"
