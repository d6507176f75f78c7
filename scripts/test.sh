#!/usr/bin/env bash
# Sets everything up, then lints, type-checks and runs the whole test suite.
#  - headless Chromium and its driver from Debian for the report's browser test (root + apt-get;
#    idempotent: skipped when /usr/bin/chromium and /usr/bin/chromedriver are there; without them
#    that one test is skipped with the reason);
#  - selenium, which drives it (normally already installed from the package's test extras);
#  - ruff (E, F, I) and mypy, configured in pyproject.toml and installed from the test extras:
#    either failing stops the run before pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "test: installing chromium and chromium-driver with apt-get"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
      || echo "test: could not install chromium; the report's browser test will be skipped"
  else
    echo "test: /usr/bin/chromium not found and cannot be installed here (need root + apt-get);"
    echo "      the report's browser test will be skipped"
  fi
fi
if [ -x /usr/bin/chromium ] && ! .venv/bin/python -c "import selenium" 2>/dev/null; then
  echo "test: installing selenium into .venv"
  .venv/bin/python -m pip install -q --disable-pip-version-check "selenium>=4.10"
fi
echo "test: ruff check"
.venv/bin/python -m ruff check .
echo "test: mypy"
.venv/bin/python -m mypy
exec .venv/bin/python -m pytest -q "$@"
