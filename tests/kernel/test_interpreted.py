"""The Triton tap's logic in CI, which has no GPU: ``interpreted.py`` runs the kernel under
Triton's interpreter on the CPU and compares every buffer it writes with the torch path's.

Runs in the environment that has Triton (``.venv-vllm``; ``scripts/dev.sh test`` runs this
folder there). Timing is measured on a GPU (``moe-record bench``), never here.
"""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_kernel_equals_the_torch_path_under_the_interpreter():
    script = os.path.join(ROOT, "tests", "kernel", "interpreted.py")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "the kernel equals the torch path in 264 taps" in out.stdout
