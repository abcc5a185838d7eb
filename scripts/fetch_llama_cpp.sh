#!/bin/sh
# llama.cpp's own GGUF tools for tests/test_gguf.py, from the llama-cpp-python sdist on PyPI (pinned), into a cache
# directory (default ~/.cache/minicpmv/llama.cpp-$VERSION; MINICPMV_LLAMA_CPP overrides it). Idempotent:
#   $DIR/convert_hf_to_gguf.py, $DIR/conversion/, $DIR/gguf-py/   the converter and the gguf-py it imports
#   $DIR/bin/llama-quantize                                        Q4_0 / Q4_K_M / Q8_0 (built here: cmake, only that
#                                                                  target, -DGGML_NATIVE=OFF: 10-45 min on 2 cores)
# With --converter-only the build is skipped. Needs python3 with pip, cmake, a C++ compiler
# (scripts/install_test_deps.sh installs cmake/g++ when missing).
set -eu
QUANTIZE=1
if [ "${1:-}" = "--converter-only" ]; then
    QUANTIZE=0
fi
VERSION=0.3.36
DIR="${MINICPMV_LLAMA_CPP:-${XDG_CACHE_HOME:-$HOME/.cache}/minicpmv/llama.cpp-$VERSION}"
PYTHON="${PYTHON:-python3}"
JOBS="${JOBS:-2}"
if [ -f "$DIR/convert_hf_to_gguf.py" ] && { [ "$QUANTIZE" = 0 ] || [ -x "$DIR/bin/llama-quantize" ]; }; then
    echo "$DIR"
    exit 0
fi
mkdir -p "$DIR"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
"$PYTHON" -m pip download "llama-cpp-python==$VERSION" --no-binary :all: --no-deps -d "$WORK" >&2
tar xzf "$WORK/llama_cpp_python-$VERSION.tar.gz" -C "$WORK"
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
rm -rf "$DIR/conversion" "$DIR/gguf-py"
cp -r "$SRC/convert_hf_to_gguf.py" "$SRC/conversion" "$SRC/gguf-py" "$DIR/"
if [ "$QUANTIZE" = 1 ] && [ ! -x "$DIR/bin/llama-quantize" ]; then
    cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF >&2
    cmake --build "$WORK/build" --target llama-quantize -j "$JOBS" >&2
    mkdir -p "$DIR/bin"
    cp -a "$WORK/build/bin/"* "$DIR/bin/"
fi
echo "$DIR"
