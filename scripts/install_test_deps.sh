#!/bin/sh
# System dependencies of the test suite (Debian), each installed only when missing (idempotent):
# - headless Chromium for tests/test_web.py (driven by the Python `playwright` package against /usr/bin/chromium;
#   no browser is downloaded at runtime), fonts-liberation for readable text in screenshots;
# - g++-aarch64-linux-gnu and qemu-user for tests/test_kernels.py: the ARM NEON kernels are cross-compiled and
#   their checks run under qemu-aarch64;
# - cmake and g++ to build llama.cpp's llama-quantize for tests/test_gguf.py, then scripts/fetch_llama_cpp.sh (the
#   converter and llama-quantize from the llama-cpp-python sdist on PyPI, cached under ~/.cache/minicpmv).
set -eu
HERE="$(cd "$(dirname "$0")" && pwd)"
PACKAGES=""
command -v chromium >/dev/null 2>&1 || PACKAGES="$PACKAGES chromium fonts-liberation"
command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || PACKAGES="$PACKAGES g++-aarch64-linux-gnu"
command -v qemu-aarch64 >/dev/null 2>&1 || PACKAGES="$PACKAGES qemu-user"
command -v cmake >/dev/null 2>&1 || PACKAGES="$PACKAGES cmake"
command -v g++ >/dev/null 2>&1 || PACKAGES="$PACKAGES g++"
if [ -z "$PACKAGES" ]; then
    "$HERE/fetch_llama_cpp.sh" >/dev/null
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
# shellcheck disable=SC2086
$SUDO apt-get install -y --no-install-recommends $PACKAGES
command -v chromium >/dev/null
command -v aarch64-linux-gnu-g++ >/dev/null
command -v qemu-aarch64 >/dev/null
command -v cmake >/dev/null
"$HERE/fetch_llama_cpp.sh" >/dev/null
