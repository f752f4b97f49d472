#!/usr/bin/env bash
# Everything that needs a GPU, in two time-boxed tiers, on a machine where nothing can be installed:
#
#   benchmarks/gpu_check.sh --tier 1 OUTDIR   (<= 7 min) env, build of both libraries (parallel),
#                                              every gpu-marked test in parallel workers, a quick
#                                              benchmark at >= 2**26 elements
#   benchmarks/gpu_check.sh --tier 2 OUTDIR   (<= 5 min) compute-sanitizer memcheck and racecheck on
#                                              the `sanitizer` selection, then the full benchmark
#                                              with whatever time remains
#   benchmarks/gpu_check.sh --plan            (anywhere, no GPU) each tier's steps, budgets and the
#                                              number of test cases each test step selects; exits
#                                              non-zero when a test step selects nothing
#
# Runs from a source checkout with PYTHONPATH=<checkout> (no pip install), python from $PYTHON or
# PATH. Every step runs under `timeout` with its own budget, printed up front, so one hung step cannot
# eat the window; a failing step does not stop the later ones; the summary lists each step and the
# exit status is non-zero if any step failed or timed out. The build and Triton caches live in the
# checkout (.fusedreg-cache/, .triton-cache/, both git-ignored) so that tier 2, run later on the same
# machine, reuses tier 1's build.
#
# OUTDIR receives at most 5 flat files per tier (a remote runner returns only a few shallow files):
#   tier 1: gpu_check-tier1.log (this script's output: env, build, test and bench summaries)
#           tests-gpu.log  tests-gpu.xml (junit)  bench-quick.json  bench-quick.png
#   tier 2: gpu_check-tier2.log  sanitizer-memcheck.log  sanitizer-racecheck.log
#           bench-full.json  bench-full.png
# Then `python benchmarks/record_gpu_results.py OUTDIR` turns them into benchmarks/results/.
#
# Environment: PYTHON; TEST_WORKERS (pytest-xdist workers for tier 1, default: cores, at most 16);
# TEST_ARGS (extra pytest arguments for the tier-1 test run).
set -u -o pipefail

# name  budget(s)  what
TIER1_STEPS=("env 20" "build 150" "tests 160" "bench 90")
TIER2_STEPS=("build 40" "memcheck 110" "racecheck 90" "bench 60")
# -m on the command line replaces pyproject's "not huge": keep the huge cases out explicitly
GPU_SELECTION="gpu and not huge"
SANITIZER_SELECTION="sanitizer and not huge"

usage() {
    echo "usage: $0 --tier 1|2 OUTDIR | --plan" >&2
    exit 2
}

cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export FUSEDREG_CACHE_DIR=${FUSEDREG_CACHE_DIR:-$PWD/.fusedreg-cache}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.triton-cache}
PY=${PYTHON:-$(command -v python || command -v python3)}
if [ -z "$PY" ]; then
    echo "no python found: put one on PATH or set PYTHON" >&2
    exit 2
fi

budget_of() {  # budget_of STEP "${STEPS[@]}"
    local want=$1 entry
    shift
    for entry in "$@"; do
        [ "${entry%% *}" = "$want" ] && echo "${entry##* }" && return
    done
    echo 0
}

total_budget() {  # total_budget "${STEPS[@]}"
    local total=0 entry
    for entry in "$@"; do total=$((total + ${entry##* })); done
    echo $total
}

print_budget() {  # print_budget TIER "${STEPS[@]}"
    local tier=$1
    shift
    echo "tier $tier budget: $(total_budget "$@") s in all ($(printf '%s s, ' "$@" | sed 's/, $//'))"
}

# How many test cases each -m selection collects here, from one collection (CUDA cases are
# collected, and skipped, on machines without a GPU too, so these are the GPU machine's counts).
# Prints one count per selection, in order.
count_selected() {
    "$PY" - "$@" <<'PYEOF'
import sys

import pytest
from _pytest.mark.expression import Expression

selections = [Expression.compile(expr) for expr in sys.argv[1:]]
counts = [0] * len(selections)


class Count:
    @pytest.hookimpl(trylast=True)  # after conftest has marked the CUDA cases
    def pytest_collection_modifyitems(self, items):
        for item in items:
            names = {mark.name for mark in item.iter_markers()}
            for i, selection in enumerate(selections):
                counts[i] += selection.evaluate(lambda name, **_: name in names)


status = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider"], plugins=[Count()])
if status not in (0, 5):
    sys.exit(f"test collection failed (pytest exit status {status})")
print(*counts)
PYEOF
}

plan() {
    local status=0 n n_sanitizer
    echo "gpu_check plan (checkout $PWD, python $PY)"
    print_budget 1 "${TIER1_STEPS[@]}"
    echo "  env      fusedreg env"
    echo "  build    fusedreg build --cpu & fusedreg build --cuda, in parallel"
    local counts
    counts=$(count_selected "$GPU_SELECTION" "$SANITIZER_SELECTION" | tail -n 1) || {
        echo "  ERROR: test collection failed"; return 1; }
    read -r n n_sanitizer <<<"$counts"
    echo "  tests    pytest -m \"$GPU_SELECTION\" -n WORKERS: $n test cases"
    [ "${n:-0}" -gt 0 ] || { echo "  ERROR: the tier-1 test step selects no test case"; status=1; }
    echo "  bench    fusedreg bench --quick --min-elements 67108864 --no-compile (every op, fp32 + bf16)"
    print_budget 2 "${TIER2_STEPS[@]}"
    echo "  build    cached from tier 1 (rebuilds when the checkout changed)"
    echo "  memcheck compute-sanitizer --tool memcheck pytest -m \"$SANITIZER_SELECTION\": $n_sanitizer test cases"
    echo "  racecheck compute-sanitizer --tool racecheck, the same $n_sanitizer test cases"
    [ "${n_sanitizer:-0}" -gt 0 ] || { echo "  ERROR: the sanitizer steps select no test case"; status=1; }
    echo "  bench    fusedreg bench (full) until the tier's budget is spent"
    return $status
}

TIER=""
OUTARG=""
while [ $# -gt 0 ]; do
    case $1 in
        --plan) plan; exit $? ;;
        --tier) [ $# -ge 2 ] || usage; TIER=$2; shift 2 ;;
        -*) usage ;;
        *) [ -z "$OUTARG" ] || usage; OUTARG=$1; shift ;;
    esac
done
{ [ "$TIER" = 1 ] || [ "$TIER" = 2 ]; } && [ -n "$OUTARG" ] || usage
mkdir -p "$OUTARG" || exit 2
OUTDIR=$(cd "$OUTARG" && pwd)

exec > >(tee "$OUTDIR/gpu_check-tier$TIER.log") 2>&1
TEE_PID=$!
finish() {  # let tee write the last lines before the caller collects the log
    exec >&- 2>&-
    wait "$TEE_PID"
    exit "$1"
}

SUMMARY=()
FAILED=0
record() {  # record NAME STATUS SECONDS [NOTE]
    SUMMARY+=("$(printf '%-10s %-7s %4ss  %s' "$1" "$2" "$3" "${4:-}")")
    case $2 in PASS|SKIP) ;; *) FAILED=1 ;; esac
    return 0
}

# step NAME BUDGET LOGFILE|- COMMAND...: run under `timeout BUDGET`, output to LOGFILE (its tail to
# the console) or, with "-", to the console; record PASS / FAIL / TIMEOUT. The signal sent at the
# budget is $STOP_SIGNAL (default TERM); pytest gets INT, on which it stops like on Ctrl-C and still
# prints its summary and writes the junit XML of every case that ran.
step() {
    local name=$1 budget=$2 log=$3 start rc
    shift 3
    echo
    echo "=== $name (budget ${budget} s): $*"
    start=$SECONDS
    if declare -F "$1" >/dev/null; then  # a function of this script: timeout needs a process
        set -- bash -c '"$@"' "$1" "$@"
    fi
    if [ "$log" = - ]; then
        timeout --signal="${STOP_SIGNAL:-TERM}" --kill-after=20 "$budget" "$@"
        rc=$?
    else
        timeout --signal="${STOP_SIGNAL:-TERM}" --kill-after=20 "$budget" "$@" >"$log" 2>&1
        rc=$?
        tail -n 25 "$log"
    fi
    if [ $rc -eq 0 ]; then
        record "$name" PASS $((SECONDS - start))
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        record "$name" TIMEOUT $((SECONDS - start)) "over its ${budget} s budget"
    else
        record "$name" FAIL $((SECONDS - start)) "exit $rc"
    fi
    return $rc
}

build_both() {
    # Both libraries at once, their lines prefixed and printed as they come (a step cut by its
    # timeout still shows how far it got). The build log lives in the cache directory, which a
    # remote runner does not return, so on failure its end is printed here.
    local log_cpu log_cuda rc_cpu rc_cuda
    log_cpu=$(mktemp)
    log_cuda=$(mktemp)
    ( "$PY" -m fusedreg build --cpu 2>&1 | tee "$log_cpu" | sed -u 's/^/[cpu]  /'; exit "${PIPESTATUS[0]}" ) &
    local cpu_pid=$!
    ( "$PY" -m fusedreg build --cuda 2>&1 | tee "$log_cuda" | sed -u 's/^/[cuda] /'; exit "${PIPESTATUS[0]}" )
    rc_cuda=$?
    wait $cpu_pid
    rc_cpu=$?
    if [ $rc_cpu -ne 0 ] || [ $rc_cuda -ne 0 ]; then
        cat "$log_cpu" "$log_cuda" | grep -o 'build log: .*' | sort -u | while read -r _ _ path; do
            echo "--- last lines of $path"
            tail -n 60 "$path"
        done
    fi
    rm -f "$log_cpu" "$log_cuda"
    [ $rc_cpu -eq 0 ] && [ $rc_cuda -eq 0 ]
}

find_sanitizer() {
    local found home candidate
    found=$(command -v compute-sanitizer || true)
    if [ -z "$found" ]; then
        home=$("$PY" -c 'from fusedreg import _build; print(_build.cuda_home() or "")' 2>/dev/null)
        for candidate in "$home/bin/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer; do
            [ -x "$candidate" ] && found=$candidate && break
        done
    fi
    echo "$found"
}

sanitize() {  # sanitize TOOL BUDGET
    local tool=$1 budget=$2 log="$OUTDIR/sanitizer-$1.log" sanitizer
    sanitizer=$(find_sanitizer)
    if [ -z "$sanitizer" ]; then
        echo "compute-sanitizer not found (looked in PATH and the CUDA toolkit)" | tee "$log"
        record "$tool" FAIL 0 "compute-sanitizer not found"
        return
    fi
    # Without the caching allocator every tensor is its own allocation, so memcheck sees an
    # out-of-bounds access that would otherwise land inside a neighbour's cached block. pytest exits
    # 5 when nothing was collected: a sanitizer run that checked nothing fails here.
    step "$tool" "$budget" "$log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        "$sanitizer" --tool "$tool" --error-exitcode 99 --target-processes all --print-limit 50 \
        "$PY" -m pytest -q -p no:cacheprovider -m "$SANITIZER_SELECTION" -rfE
}

export PY
export -f build_both

echo "fusedreg gpu_check tier $TIER: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), python $PY, checkout $PWD, output $OUTDIR"
command -v nvidia-smi >/dev/null && nvidia-smi
TIER_START=$SECONDS

if [ "$TIER" = 1 ]; then
    print_budget 1 "${TIER1_STEPS[@]}"
    step env "$(budget_of env "${TIER1_STEPS[@]}")" - "$PY" -m fusedreg env
    step build "$(budget_of build "${TIER1_STEPS[@]}")" - build_both
    workers=${TEST_WORKERS:-$(nproc)}
    [ "$workers" -gt 16 ] && workers=16
    # shellcheck disable=SC2086  # TEST_ARGS is a list of words
    STOP_SIGNAL=INT step tests "$(budget_of tests "${TIER1_STEPS[@]}")" "$OUTDIR/tests-gpu.log" \
        "$PY" -m pytest -q -rfE -p no:cacheprovider -m "$GPU_SELECTION" -n "$workers" \
        --junitxml="$OUTDIR/tests-gpu.xml" ${TEST_ARGS:-}
    budget=$(budget_of bench "${TIER1_STEPS[@]}")
    step bench "$budget" - "$PY" -m fusedreg bench --quick --min-elements $((2**26)) --no-compile \
        --budget $((budget - 25)) --json "$OUTDIR/bench-quick.json" --plot "$OUTDIR/bench-quick.png"
else
    print_budget 2 "${TIER2_STEPS[@]}"
    step build "$(budget_of build "${TIER2_STEPS[@]}")" - build_both
    sanitize memcheck "$(budget_of memcheck "${TIER2_STEPS[@]}")"
    sanitize racecheck "$(budget_of racecheck "${TIER2_STEPS[@]}")"
    left=$(($(total_budget "${TIER2_STEPS[@]}") - (SECONDS - TIER_START)))
    if [ $left -gt 40 ]; then
        step bench "$left" - "$PY" -m fusedreg bench --budget $((left - 30)) \
            --json "$OUTDIR/bench-full.json" --plot "$OUTDIR/bench-full.png"
    else
        record bench SKIP 0 "only $left s of the tier's budget left"
    fi
fi

echo
echo "=== summary (tier $TIER, $((SECONDS - TIER_START)) s)"
printf '%s\n' "${SUMMARY[@]}"
if [ $FAILED -ne 0 ]; then
    echo "gpu_check tier $TIER: FAILED (details in $OUTDIR)"
    finish 1
fi
echo "gpu_check tier $TIER: all steps passed (details in $OUTDIR)"
finish 0
