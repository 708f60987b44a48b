"""Write ``spec/fixtures/sglang/``: dumps made by SGLang 0.5.23's own recorder code, as it writes them.

Run with the SGLang environment: ``.venv-sglang/bin/python adapters/sglang/tests/make_sglang_fixtures.py [DIR]``.

SGLang's ``ExpertDistributionRecorder`` (its gatherers, accumulators, ring buffer and
``_dump_to_file``) is driven on the CPU through a tiny MoE model whose layers call SGLang's
``select_experts``. Two things differ from a GPU server and are restored afterwards:

* device: on a GPU SGLang saves some tensors as CUDA tensors (stat ``logical_count``, detail
  ``last_physical_to_logical_map``; records are ``.cpu()`` copies). Each file is saved again
  with those storages tagged ``cuda:0`` (``torch.serialization.register_package``: the tag a
  CUDA storage gets), so loading it needs ``map_location`` exactly as SGLang's real files do.
* names: SGLang names files by ``time.time()``; fixtures get fixed times.

The legacy CSV follows sglang 0.4.5's ``dump_record`` (counts per layer and id of every
token's top-k, in first-seen order, ``layer_id,expert_id,count``), from the same routing.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE.parents[2] / "spec" / "fixtures" / "sglang"
sys.path.insert(0, str(HERE))

from sglang_tiny import NUM_EXPERTS, NUM_LAYERS, TOP_K, Batch, TinyMoE  # noqa: E402

STAT_NAME = "expert_distribution_recorder_1700000000.25.pt"
DETAIL_NAME = "expert_distribution_recorder_1700000001.5_{rank}.pt"
CSV_NAME = "expert_distribution_rank0_timestamp1700000002.75.csv"
REDUNDANT = 2  # per_pass runs with EPLB replicas: 10 physical slots for 8 experts

# -- saving with CUDA storage tags ------------------------------------------------------------
_cuda_ptrs: set[int] = set()


def _tag_cuda(storage) -> str | None:
    return "cuda:0" if storage.data_ptr() in _cuda_ptrs else None


def _never(storage, location):
    return None


torch.serialization.register_package(1, _tag_cuda, _never)


def save_with_cuda_tensors(obj, path: str, cuda_tensors: list[torch.Tensor]) -> None:
    """``torch.save`` as on a GPU: ``cuda_tensors``' storages say ``cuda:0``."""
    _cuda_ptrs.update(t.untyped_storage().data_ptr() for t in cuda_tensors)
    try:
        torch.save(obj, path)
    finally:
        _cuda_ptrs.clear()


# -- driving SGLang's recorder ----------------------------------------------------------------
@contextlib.contextmanager
def sglang_runtime(model_dir: str, dump_dir: str, **fields) -> Iterator[object]:
    """Publish SGLang's flags, route its recorder's device to the CPU and its dumps to ``dump_dir``."""
    import torch.distributed as dist
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.eplb import expert_distribution
    from sglang.srt.eplb.expert_location import ExpertLocationMetadata
    from sglang.srt.runtime_context import get_context

    if not dist.is_initialized():  # the stat dump all-reduces over the world
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    saved_device, saved_dir = expert_distribution.get_device, os.environ.get("SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR")
    expert_distribution.get_device = lambda device_id=None: "cpu"
    os.environ["SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR"] = dump_dir
    previous = expert_distribution.get_global_expert_distribution_recorder()
    try:
        with get_context().override_server_args(model_path=model_dir, device="cpu", **fields):
            meta = ExpertLocationMetadata.init_trivial(ModelConfig(model_path=model_dir), moe_ep_rank=0)
            rec = expert_distribution.ExpertDistributionRecorder.init_new(meta, rank=0)
            expert_distribution.set_global_expert_distribution_recorder(rec)
            yield rec
    finally:
        expert_distribution.set_global_expert_distribution_recorder(previous)
        expert_distribution.get_device = saved_device
        if saved_dir is None:
            os.environ.pop("SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR", None)
        else:
            os.environ["SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR"] = saved_dir


def _passes(model: TinyMoE, rec, sizes: list[int], seed: int) -> list[torch.Tensor]:
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    g = torch.Generator().manual_seed(seed)
    inputs = []
    for pass_id, tokens in enumerate(sizes):
        ids = torch.randint(0, 128, (tokens,), generator=g)
        batch = Batch(ids, torch.arange(tokens), [tokens], ForwardMode.EXTEND)
        with rec.with_forward_pass(10 + pass_id, batch):
            model(ids)
        inputs.append(ids)
    return inputs


def _only_file(directory: str) -> str:
    (path,) = glob.glob(os.path.join(directory, "*.pt"))
    return path


def write_model_config(directory: str) -> str:
    config = {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 128,
        "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16,
        "num_hidden_layers": NUM_LAYERS, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
        "num_experts": NUM_EXPERTS, "num_experts_per_tok": TOP_K, "max_position_embeddings": 256,
    }  # fmt: skip
    Path(directory, "config.json").write_text(json.dumps(config))
    return directory


def make(out: Path) -> list[Path]:
    """Write every fixture under ``out``; return their paths."""
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_config(tmp)
        # stat: a 4-row ring, 3 passes: SGLang dumps the whole ring, one row still zero.
        d = tempfile.mkdtemp(dir=tmp)
        with sglang_runtime(model_dir, d, expert_distribution_recorder_mode="stat",
                            expert_distribution_recorder_buffer_size=4) as rec:  # fmt: skip
            rec.start_record()
            model = TinyMoE(seed=11)
            _passes(model, rec, [5, 3, 6], seed=1)
            rec.dump_record()
        obj = torch.load(_only_file(d), weights_only=True)
        path = out / "stat" / STAT_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        save_with_cuda_tensors(obj, str(path), [obj["logical_count"]])
        written.append(path)

        # per_pass with EPLB replicas: ids are physical slots, fed to SGLang's hook directly.
        d = tempfile.mkdtemp(dir=tmp)
        with sglang_runtime(model_dir, d, expert_distribution_recorder_mode="per_pass",
                            ep_num_redundant_experts=REDUNDANT) as rec:  # fmt: skip
            rec.start_record()
            g = torch.Generator().manual_seed(2)
            for pass_id, tokens in enumerate([4, 7]):
                with rec.with_forward_pass(20 + pass_id, None):
                    for layer in range(1, NUM_LAYERS):
                        with rec.with_current_layer(layer):
                            ids = torch.randint(-1, NUM_EXPERTS + REDUNDANT, (tokens, TOP_K), generator=g)
                            rec.on_select_experts(topk_ids=ids)
            rec.dump_record()
        obj = torch.load(_only_file(d), weights_only=True)
        path = out / "per_pass" / DETAIL_NAME.format(rank=0)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_with_cuda_tensors(obj, str(path), [obj["last_physical_to_logical_map"]])
        written.append(path)

        # per_token: SGLang's detail gatherer (8 id columns, -1 unfilled), through the tiny model.
        d = tempfile.mkdtemp(dir=tmp)
        with sglang_runtime(model_dir, d, expert_distribution_recorder_mode="per_token",
                            chunked_prefill_size=8) as rec:  # fmt: skip
            rec.start_record()
            model = TinyMoE(seed=13)
            _passes(model, rec, [3, 2], seed=3)
            rec.dump_record()
        obj = torch.load(_only_file(d), weights_only=True)
        path = out / "per_token" / DETAIL_NAME.format(rank=0)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_with_cuda_tensors(obj, str(path), [obj["last_physical_to_logical_map"]])
        written.append(path)

        # legacy CSV (0.4.5): the same model's routing, counted per layer and id in first-seen order.
        from sglang.srt.layers.moe.topk import TopKConfig, select_experts

        counts: dict[int, dict[int, int]] = {}
        g = torch.Generator().manual_seed(4)
        for layer in range(1, NUM_LAYERS):
            logits = torch.randn(6, NUM_EXPERTS, generator=g)
            out_ids = select_experts(torch.zeros(6, 4), logits, TopKConfig(top_k=TOP_K, torch_native=True)).topk_ids
            per_layer = counts.setdefault(layer, {})
            for e in out_ids.flatten().tolist():
                per_layer[e] = per_layer.get(e, 0) + 1
        lines = ["layer_id,expert_id,count\n"]
        lines += [f"{layer},{e},{c}\n" for layer, per_layer in counts.items() for e, c in per_layer.items()]
        path = out / "legacy" / CSV_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(lines))
        written.append(path)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    for p in make(target):
        print(p)
