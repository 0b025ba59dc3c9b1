#!/usr/bin/env bash
# Build llama-cpp-python's libraries (the llama.cpp it vendors) for an AVX2-only CPU: AVX2, FMA,
# F16C and BMI2 kept; native tuning, AVX-512 (F, VBMI, VNNI, BF16), AVX-VNNI and AMX off. The
# libraries go to OUT/lib, for `--emulate-avx2 OUT/lib` (llama-cpp-python loads them through
# LLAMA_CPP_LIB_PATH); the installed package is left as it is.
#
#     benchmarks/build_llama_avx2.sh /work/llama_avx2      # ~15 min on 2 busy cores
set -euo pipefail
OUT=${1:?usage: benchmarks/build_llama_avx2.sh OUT_DIR}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
PIP=${PIP:-$(dirname "$0")/../.venv/bin/pip}
mkdir -p "$OUT/src"
OUT=$(cd "$OUT" && pwd)
if [ ! -d "$OUT/src/llama_cpp_python-$VERSION" ]; then
  "$PIP" download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$OUT/src"
  tar xzf "$OUT/src/llama_cpp_python-$VERSION.tar.gz" -C "$OUT/src"
fi
cmake -S "$OUT/src/llama_cpp_python-$VERSION/vendor/llama.cpp" -B "$OUT/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=OFF -DGGML_CPU_ALL_VARIANTS=OFF -DGGML_BACKEND_DL=OFF \
  -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
  -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX_VNNI=OFF \
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_OPENMP=ON -DGGML_CCACHE=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF \
  -DLLAMA_BUILD_COMMON=OFF -DLLAMA_CURL=OFF -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON '-DCMAKE_INSTALL_RPATH=$ORIGIN'
cmake --build "$OUT/build" --target llama -j "$(nproc)"
mkdir -p "$OUT/lib"
cp -a "$OUT"/build/bin/*.so* "$OUT/lib/"
echo "$OUT/lib"
