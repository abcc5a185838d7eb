#!/bin/sh
# System dependencies of the test suite: headless Chromium for tests/test_web.py (driven by the Python
# `playwright` package against /usr/bin/chromium; no browser is downloaded at runtime). Idempotent.
set -eu
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
# fonts-liberation: readable text in screenshots
$SUDO apt-get install -y --no-install-recommends chromium fonts-liberation
command -v chromium >/dev/null
