#!/usr/bin/env bash
# Sets up featcircuit in ./.venv: idempotent, offline-friendly, nothing installed by hand.
#  - the CPU build of torch first (a bare `torch` requirement would pull a multi-GB CUDA build);
#  - the package itself (editable) with its test extras;
#  - graphviz's `dot` from Debian where we can (root + apt-get); otherwise a note, not a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# This machine's pip config names local mirrors that may be absent; their warnings are noise.
quiet_pip() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
TORCH_PIN=${FEATCIRCUIT_TORCH:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python

if ! "$VPY" -c "import torch" 2>/dev/null; then
  echo "setup: installing $TORCH_PIN (CPU build)"
  quiet_pip "$VPY" -m pip install -q --disable-pip-version-check "$TORCH_PIN"
fi

# Reinstall the package only when its metadata changed since the last setup.
STAMP=.venv/.featcircuit-setup
WANT=$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ] || ! .venv/bin/featcircuit --help >/dev/null 2>&1; then
  echo "setup: installing featcircuit and its dependencies into .venv"
  quiet_pip "$VPY" -m pip install -q --disable-pip-version-check -e ".[test]"
  echo "$WANT" > "$STAMP"
fi

if ! command -v dot >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing graphviz (dot) with apt-get"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq graphviz >/dev/null) \
      || echo "setup: could not install graphviz; circuits are still written as .dot files"
  else
    echo "setup: graphviz 'dot' not found and cannot be installed here (need root + apt-get);"
    echo "       circuits are still written as .dot files: install graphviz to render SVGs"
  fi
fi
echo "setup: ready (.venv/bin/featcircuit)"
