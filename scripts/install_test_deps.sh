#!/bin/sh
# System dependencies of the test suite (Debian), each installed only when missing (idempotent):
# - headless Chromium for tests/test_web.py (driven by the Python `playwright` package against /usr/bin/chromium;
#   no browser is downloaded at runtime), fonts-liberation for readable text in screenshots;
# - g++-aarch64-linux-gnu and qemu-user for tests/test_kernels.py: the ARM NEON kernels are cross-compiled and
#   their checks run under qemu-aarch64;
# - scripts/fetch_llama_cpp.sh: llama.cpp's converter from the llama-cpp-python sdist on PyPI (cached under
#   ~/.cache/minicpmv), and with MINICPMV_BUILD_LLAMA_QUANTIZE=1 its llama-quantize (cmake, g++).
set -eu
# llama-quantize (tests/test_gguf.py's Q4_0 / Q4_K_M files) takes 10-45 min to build on 2 cores: only with
# MINICPMV_BUILD_LLAMA_QUANTIZE=1; without it those tests say so and skip, the converter's own types still run.
LLAMA_QUANTIZE="--converter-only"
if [ "${MINICPMV_BUILD_LLAMA_QUANTIZE:-0}" = 1 ]; then
    LLAMA_QUANTIZE=""
fi
HERE="$(cd "$(dirname "$0")" && pwd)"
PACKAGES=""
command -v chromium >/dev/null 2>&1 || PACKAGES="$PACKAGES chromium fonts-liberation"
command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || PACKAGES="$PACKAGES g++-aarch64-linux-gnu"
command -v qemu-aarch64 >/dev/null 2>&1 || PACKAGES="$PACKAGES qemu-user"
[ -n "$LLAMA_QUANTIZE" ] || command -v cmake >/dev/null 2>&1 || PACKAGES="$PACKAGES cmake"
command -v g++ >/dev/null 2>&1 || PACKAGES="$PACKAGES g++"
if [ -z "$PACKAGES" ]; then
    "$HERE/fetch_llama_cpp.sh" $LLAMA_QUANTIZE >/dev/null
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
[ -n "$LLAMA_QUANTIZE" ] || command -v cmake >/dev/null
"$HERE/fetch_llama_cpp.sh" $LLAMA_QUANTIZE >/dev/null
