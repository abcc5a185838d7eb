#!/bin/sh
# llama.cpp built for one instruction set, for bench/cpu.py's peer rows (LLAMA_CPP_DIR=<the printed directory>):
# llama-bench, llama-quantize and llama-mtmd-cli plus the converter, from the same pinned llama-cpp-python sdist on
# PyPI as scripts/fetch_llama_cpp.sh. ISA=avx2 (default: -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON
# -DGGML_F16C=ON -DGGML_AVX512=OFF, what an AVX2-only CPU runs) or ISA=native. Into
# ~/.cache/minicpmv/llama.cpp-bench-$ISA-$VERSION (MINICPMV_LLAMA_CPP_BENCH overrides); idempotent.
# Takes ~15-20 min on 2 cores. Then: LLAMA_CPP_DIR=<dir> python bench/cpu.py --isa avx2 --quick
set -eu
VERSION=0.3.36
ISA="${ISA:-avx2}"
DIR="${MINICPMV_LLAMA_CPP_BENCH:-${XDG_CACHE_HOME:-$HOME/.cache}/minicpmv/llama.cpp-bench-$ISA-$VERSION}"
PYTHON="${PYTHON:-python3}"
JOBS="${JOBS:-2}"
case "$ISA" in
    avx2) FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF" ;;
    native) FLAGS="-DGGML_NATIVE=ON" ;;
    *) echo "ISA must be avx2 or native, not $ISA" >&2; exit 2 ;;
esac
if [ -x "$DIR/bin/llama-bench" ] && [ -x "$DIR/bin/llama-quantize" ] && [ -f "$DIR/convert_hf_to_gguf.py" ]; then
    echo "$DIR"
    exit 0
fi
mkdir -p "$DIR/bin"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
"$PYTHON" -m pip download "llama-cpp-python==$VERSION" --no-binary :all: --no-deps -d "$WORK" >&2
tar xzf "$WORK/llama_cpp_python-$VERSION.tar.gz" -C "$WORK"
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
rm -rf "$DIR/conversion" "$DIR/gguf-py"
cp -r "$SRC/convert_hf_to_gguf.py" "$SRC/gguf-py" "$DIR/"
[ -d "$SRC/conversion" ] && cp -r "$SRC/conversion" "$DIR/"
# shellcheck disable=SC2086
cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release $FLAGS -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF >&2
for target in llama-bench llama-quantize llama-mtmd-cli; do
    cmake --build "$WORK/build" --target "$target" -j "$JOBS" >&2 || echo "could not build $target" >&2
    [ -x "$WORK/build/bin/$target" ] && cp "$WORK/build/bin/$target" "$DIR/bin/"
done
echo "$DIR"
