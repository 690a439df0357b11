#!/usr/bin/env bash
# Fill wheelhouse/ with everything benchmarks/gpu_check.sh installs on a machine without network.
#
# Run on a machine with network access, from anywhere inside the checkout:
#
#     tools/build_wheelhouse.sh            # -> wheelhouse/
#     WHEELHOUSE=/some/dir tools/build_wheelhouse.sh
#
# What goes in (pure-Python wheels only, a few MB, for Python 3.10 to 3.13 on any platform):
#   * arraybn, built from this checkout (a fallback: gpu_check.sh builds the checkout itself first);
#   * array-api-compat (arraybn's only non-NumPy dependency);
#   * the test tools: array-api-strict, pytest, hypothesis, tqdm and their dependencies;
#   * hatchling and its dependencies, so the GPU machine can build arraybn from the checkout offline.
# NumPy, CuPy, torch and JAX are not included: the GPU machine provides them.
#
# wheelhouse/ is git-ignored: copy it along with the checkout (see docs/backends.md).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WH="${WHEELHOUSE:-$ROOT/wheelhouse}"
PY="${PYTHON:-python3}"

# Pure-Python packages and their dependencies, resolved for the oldest and the newest Python
# arraybn supports.
# --platform any + --abi none: the py3-none-any wheel even where a package also ships compiled ones.
WITH_DEPS=(array-api-compat pytest hypothesis tqdm "hatchling>=1.18")
# array-api-strict: its one dependency, NumPy, is the GPU machine's. tomli, exceptiongroup and
# typing_extensions: what pytest and hatchling need on Python 3.10 only; named here because pip
# evaluates the dependencies' markers for the running Python, not for --python-version.
NO_DEPS=(array-api-strict tomli exceptiongroup typing_extensions)

mkdir -p "$WH"
for pyver in 3.10 3.13; do
    echo "== pure-Python wheels for Python $pyver -> $WH"
    "$PY" -m pip download --quiet --only-binary=:all: \
        --platform any --implementation py --abi none --python-version "$pyver" \
        --dest "$WH" "${WITH_DEPS[@]}"
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: \
        --platform any --implementation py --abi none --python-version "$pyver" \
        --dest "$WH" "${NO_DEPS[@]}"
done

echo "== arraybn from $ROOT"
rm -f "$WH"/arraybn-*.whl
"$PY" -m pip wheel --quiet --no-deps --wheel-dir "$WH" "$ROOT"

echo "== wheelhouse:"
ls -1 "$WH"
du -sh "$WH"
