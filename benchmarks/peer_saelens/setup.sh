#!/usr/bin/env bash
# Make this benchmark's own venv (.venv here): SAELens pins transformer-lens<4, featcircuit
# needs >=4, so the two cannot share one environment. torch first, so pip uses the CPU wheel.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="${PYTHON:-python3.11}"
[ -x "$here/.venv/bin/python" ] || "$py" -m venv "$here/.venv"
pip="$here/.venv/bin/python -m pip"
wheel=$(ls /opt/wheels/torch-2.13.0*.whl 2>/dev/null | head -1 || true)
$pip install -q ${wheel:-torch==2.13.0}
$pip install -q sae-lens safetensors
"$here/.venv/bin/python" -c "import sae_lens, torch; print('sae_lens', sae_lens.__version__, 'torch', torch.__version__)"
