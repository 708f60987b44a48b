"""TensorRT-LLM's expert statistic folder, read into a per_pass dump.

TensorRT-LLM (``tensorrt_llm/_torch/expert_statistic.py``, commits c85e8726 / 0fccc5b9) writes,
when ``EXPERT_STATISTIC_ITER_RANGE=start-stop`` is set, into ``$EXPERT_STATISTIC_PATH``:

* ``meta_info.json`` (rank 0): ``{"num_experts": E, "num_experts_per_token": k}``;
* ``rank{R}.safetensors``: key ``"{iter}_{layer}"`` -> the 1-D ``bincount`` of that layer's
  selected experts over that iteration on rank R (int64; length E).

Its own loader (``examples/wide_ep/ep_load_balancer/utils.py``, commit 7ce477f3) sums the rank
files element-wise and skips ``rank{R}_raw.safetensors`` (raw ids); we do the same. With its
load balancer on, the counts are over expert *slots* and ``num_experts`` is the slot count: the
E axis is then physical slots.
"""

from __future__ import annotations

import glob
import json
import os
import re

import torch

from ..errors import DumpFormatError
from ..schema.dump import Dump
from ..schema.io import check_regular_file
from ..schema.tensors import MAX_EMPTY_SPAN
from .passes import add_count, per_pass_dump
from .safetensors import read_safetensors

_KEY = re.compile(r"^(\d+)_(\d+)$")
_RANK = re.compile(r"rank(\d+)\.safetensors$")


def is_trtllm_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "meta_info.json"))


def load_trtllm_statistic(folder: str, *, num_layers: int | None = None) -> Dump:
    """Read a TensorRT-LLM expert statistic folder: one row per iteration, ranks summed.

    ``num_layers``: the model's decoder layers when the last ones recorded nothing (default:
    the highest layer recorded + 1).

    >>> dump = load_trtllm_statistic("expert_statistic")  # doctest: +SKIP
    """
    meta_path = os.path.join(folder, "meta_info.json")
    check_regular_file(meta_path)  # a FIFO would block the open
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        E, top_k = int(meta["num_experts"]), int(meta["num_experts_per_token"])
    except FileNotFoundError:
        raise DumpFormatError(f"{folder}: no meta_info.json: not a TensorRT-LLM expert statistic folder") from None
    except (KeyError, TypeError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise DumpFormatError(
            f"{meta_path}: expected {{'num_experts': int, 'num_experts_per_token': int}}: {e}"
        ) from None
    if not 1 <= E <= MAX_EMPTY_SPAN or not 1 <= top_k <= E:  # a count row per layer: E bounds its memory
        raise DumpFormatError(f"{meta_path}: num_experts={E}, num_experts_per_token={top_k} are not valid")
    files = sorted(
        (f for f in glob.glob(os.path.join(glob.escape(folder), "rank*.safetensors")) if _RANK.search(f)),
        key=lambda f: int(_RANK.search(f).group(1)),  # type: ignore[union-attr]
    )
    if not files:
        raise DumpFormatError(f"{folder}: no rank{{R}}.safetensors files next to meta_info.json")
    counts: dict[tuple[int, int], torch.Tensor] = {}
    for path in files:
        for key, value in read_safetensors(path).items():
            m = _KEY.match(key)
            if m is None:
                raise DumpFormatError(f"{path}: key {key!r} is not '{{iter}}_{{layer}}'")
            if value.dim() != 1 or value.shape[0] != E:
                raise DumpFormatError(
                    f"{path}: {key}: expected a 1-D count of length num_experts={E}, got shape {list(value.shape)}"
                )
            if value.dtype.is_floating_point or value.dtype == torch.bool:
                raise DumpFormatError(f"{path}: {key}: counts must be integers, got {value.dtype}")
            if value.numel() and int(value.min()) < 0:
                raise DumpFormatError(f"{path}: {key}: negative count")
            it_layer = (int(m.group(1)), int(m.group(2)))
            add_count(counts, it_layer, value.to(torch.int64), num_experts=E, where=f"{path}: key {key!r}")
    return per_pass_dump(
        counts, engine="tensorrt-llm", num_experts=E, top_k=top_k, num_layers=num_layers, source=folder
    )
