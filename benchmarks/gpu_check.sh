#!/usr/bin/env bash
# Everything that needs a GPU, in one command, on a machine where nothing can be installed:
#   benchmarks/gpu_check.sh OUTDIR
# Runs from a source checkout with PYTHONPATH=<checkout> (no pip install), python from $PYTHON or
# PATH. Steps: env, build, all tests (gpu-marked included), compute-sanitizer memcheck + racecheck
# on a small gpu selection, quick benchmark. A failing step does not stop the later ones; the
# summary at the end lists each step, and the exit status is non-zero if any step failed.
#
# OUTDIR receives at most 7 files, flat, with plain names, so that a remote runner that returns
# only a few shallow files gets them all:
#   gpu_check.log  this script's whole output (env, build, bench table, summary)
#   tests.log  tests.xml (junit)  sanitizer-memcheck.log  sanitizer-racecheck.log
#   bench-quick.json  bench-quick.png
# Environment: PYTHON; TEST_ARGS (extra pytest arguments for the full test run, e.g. "-x");
# SANITIZER_SELECTION (pytest -k expression for the sanitizer runs, default "small or sanitizer").
set -u -o pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
OUTDIR=$(cd "$1" && pwd)
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-$(command -v python || command -v python3)}
if [ -z "$PY" ]; then
    echo "no python found: put one on PATH or set PYTHON" >&2
    exit 2
fi
SELECTION=${SANITIZER_SELECTION:-small or sanitizer}

exec > >(tee "$OUTDIR/gpu_check.log") 2>&1
TEE_PID=$!
finish() {  # let tee write the last lines before the caller collects the log
    exec >&- 2>&-
    wait "$TEE_PID"
    exit "$1"
}

SUMMARY=()
FAILED=0

record() {  # record NAME STATUS SECONDS [NOTE]
    SUMMARY+=("$(printf '%-20s %-5s %5ss  %s' "$1" "$2" "$3" "${4:-}")")
    [ "$2" = FAIL ] && FAILED=1
    return 0
}

# step NAME LOGFILE|- COMMAND...: run, send output to LOGFILE (and its tail to the console) or,
# with "-", straight to the console; record PASS/FAIL by exit status.
step() {
    local name=$1 log=$2 start rc
    shift 2
    echo
    echo "=== $name: $*"
    start=$SECONDS
    if [ "$log" = - ]; then
        "$@"
        rc=$?
    else
        "$@" >"$log" 2>&1
        rc=$?
        tail -n 25 "$log"
    fi
    if [ $rc -eq 0 ]; then record "$name" PASS $((SECONDS - start)); else record "$name" FAIL $((SECONDS - start)) "exit $rc"; fi
    return $rc
}

echo "fusedreg gpu_check: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), python $PY, checkout $PWD, output $OUTDIR"
command -v nvidia-smi >/dev/null && nvidia-smi

step env - "$PY" -m fusedreg env

build_showing_logs() {
    # The build log lives in the cache directory, which a remote runner does not return: on failure
    # print its end here.
    local out rc
    out=$(mktemp)
    "$PY" -m fusedreg build 2>&1 | tee "$out"
    rc=${PIPESTATUS[0]}
    if [ $rc -ne 0 ]; then
        grep -o 'build log: .*' "$out" | sort -u | while read -r _ _ path; do
            echo "--- last lines of $path"
            tail -n 60 "$path"
        done
    fi
    rm -f "$out"
    return $rc
}
step build - build_showing_logs

# shellcheck disable=SC2086  # TEST_ARGS is a list of words
step tests "$OUTDIR/tests.log" "$PY" -m pytest -q -rfE -p no:cacheprovider --junitxml="$OUTDIR/tests.xml" ${TEST_ARGS:-}

SANITIZER=$(command -v compute-sanitizer || true)
if [ -z "$SANITIZER" ]; then
    home=$("$PY" -c 'from fusedreg import _build; print(_build.cuda_home() or "")' 2>/dev/null)
    for candidate in "$home/bin/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer; do
        [ -x "$candidate" ] && SANITIZER=$candidate && break
    done
fi
for tool in memcheck racecheck; do
    log="$OUTDIR/sanitizer-$tool.log"
    if [ -z "$SANITIZER" ]; then
        echo "compute-sanitizer not found (looked in PATH and the CUDA toolkit): $tool skipped" | tee "$log"
        record "sanitizer-$tool" SKIP 0 "compute-sanitizer not found"
        continue
    fi
    echo
    echo "=== sanitizer-$tool: pytest -m gpu -k \"$SELECTION\""
    start=$SECONDS
    # Without the caching allocator every tensor is its own allocation, so memcheck sees an
    # out-of-bounds access that would otherwise land inside a neighbour's cached block.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" --error-exitcode 99 \
        --target-processes all --print-limit 50 \
        "$PY" -m pytest -q -x -p no:cacheprovider -m gpu -k "$SELECTION" >"$log" 2>&1
    rc=$?
    tail -n 15 "$log"
    if [ $rc -eq 5 ]; then  # pytest: no tests collected
        record "sanitizer-$tool" SKIP $((SECONDS - start)) "no gpu test matches -k \"$SELECTION\""
    elif [ $rc -eq 0 ]; then
        record "sanitizer-$tool" PASS $((SECONDS - start))
    else
        record "sanitizer-$tool" FAIL $((SECONDS - start)) "exit $rc (99: sanitizer errors)"
    fi
done

step bench - "$PY" -m fusedreg bench --quick --json "$OUTDIR/bench-quick.json" --plot "$OUTDIR/bench-quick.png"

echo
echo "=== summary"
printf '%s\n' "${SUMMARY[@]}"
if [ $FAILED -ne 0 ]; then
    echo "gpu_check: FAILED (details in $OUTDIR)"
    finish 1
fi
echo "gpu_check: all steps passed or were skipped (details in $OUTDIR)"
finish 0
