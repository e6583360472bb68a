#!/usr/bin/env bash
# The GPU verdict in one device call (bench/gpu_verdict.py says what it measures).
# Here: `make gpu-wheels`; then the device call: command `bash bench/gpu.sh`, carry [".whl"].
# Installs the carried wheels (what the GPU image lacks) outside the image's environment, then
# runs the driver with its results in $OUT. Arguments go to the driver (--smoke, --deadline_s,
# --stages, --time_boxes, --out). PYTHON and WHEELS override the interpreter and wheel folder.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    # A failed install costs only the stages that import what it brings: go on without it.
    if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHEELS"/*.whl; then
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "gpu.sh: installing $WHEELS/*.whl failed; going on without them" >&2
    fi
fi
# The package itself, editable (mvar_jax.kernels and mvar_jax.configs are the repository's top-level
# kernels/ and configs/), built offline with the carried setuptools.
"$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation -e . \
    || echo "gpu.sh: the editable install of mvar_jax failed; its imports will fail" >&2
export PYTHONUNBUFFERED=1
exec "$PYTHON" -m bench.gpu_verdict --out "${OUT:-out/gpu_verdict}" "$@"
