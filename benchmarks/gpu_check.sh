#!/usr/bin/env bash
# One command for a GPU machine without network: install arraybn offline, then run the GPU
# tests, the conformance goldens on CuPy and torch CUDA, and the GPU benchmarks.
#
#     benchmarks/gpu_check.sh                 # everything
#     benchmarks/gpu_check.sh --no-bench      # tests and conformance only
#     benchmarks/gpu_check.sh --help
#
# The machine must already have NumPy, CuPy, torch (CUDA build) and, optionally, JAX. Everything
# else (arraybn, array-api-compat, and array-api-strict, pytest, hypothesis, tqdm where absent) is
# installed from wheelhouse/, a git-ignored folder filled beforehand on a networked machine by
# tools/build_wheelhouse.sh and copied with the checkout (docs/backends.md, "GPU check").
#
# Settings (environment variables):
#   PYTHON            interpreter that has CuPy/torch/JAX          (default: python3)
#   WHEELHOUSE        folder of wheels                             (default: <checkout>/wheelhouse)
#   GPU_VENV          virtual environment created on top of PYTHON's packages
#                     (--system-site-packages); "none" installs into PYTHON itself
#                                                                  (default: <checkout>/build/gpu-venv)
#   GPU_OUT           logs, JUnit XML, reports, benchmark results  (default: <checkout>/benchmarks/results/gpu-check)
#   GPU_BACKENDS      conftest backends for pytest                 (default: cupy,torch_cuda)
#   CONFORMANCE_BACKENDS  `python -m conformance --backend` values (default: "cupy torch_cuda")
#   BENCH_BACKENDS    `python -m benchmarks --backends` value      (default: numpy,torch,torch-cuda,cupy,jax)
#
# Exit status: 0 when every step that ran passed, 1 otherwise; steps that cannot run (no GPU,
# no conformance runner, no benchmark suite) are reported as SKIP with the reason.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
WHEELHOUSE="${WHEELHOUSE:-$ROOT/wheelhouse}"
GPU_VENV="${GPU_VENV:-$ROOT/build/gpu-venv}"
GPU_OUT="${GPU_OUT:-$ROOT/benchmarks/results/gpu-check}"
GPU_BACKENDS="${GPU_BACKENDS:-cupy,torch_cuda}"
CONFORMANCE_BACKENDS="${CONFORMANCE_BACKENDS:-cupy torch_cuda}"
BENCH_BACKENDS="${BENCH_BACKENDS:-numpy,torch,torch-cuda,cupy,jax}"

DO_INSTALL=1 DO_TESTS=1 DO_CONFORMANCE=1 DO_BENCH=1
for arg in "$@"; do
    case "$arg" in
        --no-install) DO_INSTALL=0 ;;
        --no-tests) DO_TESTS=0 ;;
        --no-conformance) DO_CONFORMANCE=0 ;;
        --no-bench) DO_BENCH=0 ;;
        -h|--help) sed -n '2,28p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
    esac
done

mkdir -p "$GPU_OUT"
SUMMARY=()
FAILED=0

record() {  # record STEP STATUS SECONDS [NOTE]
    SUMMARY+=("$(printf '%-34s %-5s %6ss  %s' "$1" "$2" "$3" "${4:-}")")
    [ "$2" = "FAIL" ] && FAILED=1
    return 0
}

run_step() {  # run_step NAME LOGFILE CMD...: run, tee to the log, record PASS/FAIL with the time
    local name="$1" log="$2"; shift 2
    echo
    echo "===== $name"
    echo "      $*"
    local start=$SECONDS
    "$@" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    local took=$((SECONDS - start))
    if [ "$rc" -eq 0 ]; then record "$name" PASS "$took" "log: ${log#"$ROOT"/}"; else
        record "$name" FAIL "$took" "exit $rc, log: ${log#"$ROOT"/}"; fi
    return "$rc"
}

# ---------------------------------------------------------------- interpreter
if [ "$DO_INSTALL" -eq 1 ]; then
    if [ ! -d "$WHEELHOUSE" ] || ! ls "$WHEELHOUSE"/array_api_compat-*.whl >/dev/null 2>&1; then
        echo "No wheels in $WHEELHOUSE." >&2
        echo "Fill it on a machine with network access (tools/build_wheelhouse.sh) and copy the folder" >&2
        echo "with the checkout: it is git-ignored, so a plain clone or a tree of tracked files lacks it." >&2
        echo "Or run with --no-install where arraybn and array-api-compat are already installed." >&2
        exit 2
    fi
    if [ "$GPU_VENV" != "none" ]; then
        if [ ! -x "$GPU_VENV/bin/python" ]; then
            echo "===== virtual environment $GPU_VENV (on top of $PYTHON's packages)"
            "$PYTHON" -m venv --system-site-packages "$GPU_VENV" || {
                echo "could not create a virtual environment; rerun with GPU_VENV=none to install into $PYTHON" >&2
                exit 2
            }
        fi
        PY="$GPU_VENV/bin/python"
        # --system-site-packages sees the base interpreter's packages only; where PYTHON is itself a
        # virtual environment (the usual way CUDA stacks are installed), its packages are added
        # through a .pth file so that CuPy, torch and JAX stay visible.
        "$PYTHON" -c 'import site; print("\n".join(site.getsitepackages()))' \
            > "$("$PY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/_gpu_check_base.pth"
    else
        PY="$PYTHON"
    fi
else
    PY="$PYTHON"
    [ "$GPU_VENV" != "none" ] && [ -x "$GPU_VENV/bin/python" ] && PY="$GPU_VENV/bin/python"
fi
echo "interpreter: $PY"

pip_offline() { "$PY" -m pip install --no-index --find-links "$WHEELHOUSE" --disable-pip-version-check "$@"; }

# -------------------------------------------------------------------- install
if [ "$DO_INSTALL" -eq 1 ]; then
    install_all() {
        # array-api-compat: the wheelhouse's version (the tested one), even over an older one
        pip_offline --upgrade array-api-compat || return 1
        # test tools only where absent: keep whatever the machine already has
        local mod_pkg mod pkg
        for mod_pkg in array_api_strict:array-api-strict pytest:pytest hypothesis:hypothesis tqdm:tqdm; do
            mod="${mod_pkg%%:*}" pkg="${mod_pkg#*:}"
            if "$PY" -c "import $mod" 2>/dev/null; then
                echo "$pkg: already installed, kept"
            else
                pip_offline "$pkg" || return 1
            fi
        done
        # arraybn: built from this checkout (hatchling comes from the wheelhouse); the prebuilt
        # wheel in the wheelhouse only where that fails (it may be older than the checkout)
        if ! pip_offline --no-deps --force-reinstall "$ROOT"; then
            echo "WARNING: building arraybn from the checkout failed; installing the wheelhouse's arraybn wheel" >&2
            pip_offline --no-deps --force-reinstall "$WHEELHOUSE"/arraybn-*.whl || return 1
        fi
    }
    run_step "install (offline, from wheelhouse)" "$GPU_OUT/install.log" install_all || {
        echo "installation failed; see $GPU_OUT/install.log" >&2
        printf '%s\n' "${SUMMARY[@]}"
        exit 1
    }
fi

# ---------------------------------------------------------------- environment
echo
echo "===== environment"
"$PY" benchmarks/gpu/env_report.py "$GPU_OUT/environment.json"
if [ $? -ne 0 ]; then
    echo "NOTE: no usable GPU found (neither CuPy nor torch CUDA): the GPU tests will skip, and the"
    echo "      CuPy / torch CUDA conformance runs and benchmarks are skipped."
    HAVE_GPU=0
else
    HAVE_GPU=1
fi

backend_usable() {  # backend_usable NAME: is this conformance backend usable here?
    case "$1" in
        cupy) "$PY" -c "import cupy; assert cupy.cuda.runtime.getDeviceCount() > 0" 2>/dev/null ;;
        torch_cuda | torch-cuda) "$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null ;;
        jax) "$PY" -c "import jax" 2>/dev/null ;;
        *) return 0 ;;
    esac
}

# ---------------------------------------------------------------------- tests
if [ "$DO_TESTS" -eq 1 ]; then
    run_step "pytest ($GPU_BACKENDS)" "$GPU_OUT/pytest.log" \
        env ARRAYBN_TEST_BACKENDS="$GPU_BACKENDS" "$PY" -m pytest -q -rfE -p no:cacheprovider \
        --junitxml="$GPU_OUT/pytest.xml" tests
    [ "$HAVE_GPU" -eq 0 ] && SUMMARY[-1]="${SUMMARY[-1]}  (no GPU: GPU tests skipped)"
fi

# ---------------------------------------------------------------- conformance
if [ "$DO_CONFORMANCE" -eq 1 ]; then
    if [ ! -f conformance/__main__.py ]; then
        record "conformance" SKIP 0 "no conformance runner (conformance/__main__.py) in this checkout"
    else
        report_args=()
        "$PY" -c "import matplotlib" 2>/dev/null && report_args=(--report)
        for b in $CONFORMANCE_BACKENDS; do
            if ! backend_usable "$b"; then
                record "conformance --backend $b" SKIP 0 "backend not usable here (no GPU or not installed)"
                continue
            fi
            args=(--backend "$b" --no-progress)
            [ ${#report_args[@]} -gt 0 ] && args+=(--report "$GPU_OUT/conformance-$b")
            run_step "conformance --backend $b" "$GPU_OUT/conformance-$b.log" "$PY" -m conformance "${args[@]}"
        done
    fi
fi

# ----------------------------------------------------------------- benchmarks
if [ "$DO_BENCH" -eq 1 ]; then
    if [ ! -f benchmarks/__main__.py ] && [ ! -f benchmarks/run.py ]; then
        record "benchmarks" SKIP 0 "no benchmark suite (benchmarks/__main__.py or benchmarks/run.py) in this checkout"
    elif [ "$HAVE_GPU" -eq 0 ]; then
        record "benchmarks" SKIP 0 "no GPU: the GPU benchmarks were not run"
    else
        bench=("$PY" -m benchmarks)
        [ -f benchmarks/__main__.py ] || bench=("$PY" benchmarks/run.py)
        help="$("${bench[@]}" --help 2>&1 || true)"
        args=(--quick)
        [[ "$help" == *--backends* ]] && args+=(--backends "$BENCH_BACKENDS")
        [[ "$help" == *--out* ]] && args+=(--out "$GPU_OUT/benchmarks")
        run_step "benchmarks ${args[*]}" "$GPU_OUT/benchmarks.log" "${bench[@]}" "${args[@]}"
    fi
fi

# -------------------------------------------------------------------- summary
echo
echo "===== summary (logs and results in ${GPU_OUT#"$ROOT"/})"
printf '%s\n' "${SUMMARY[@]}"
exit "$FAILED"
