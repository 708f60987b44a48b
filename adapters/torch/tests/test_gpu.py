"""On CUDA: the tap inside a captured CUDA graph, and the dump-time merge over NCCL."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from moe_record_torch import attach
from moe_record_torch.tiny import TinyMoE, TinyMoEConfig
from test_distributed import check_merges, launch  # this folder is on sys.path (pytest rootdir-relative import)

pytestmark = pytest.mark.gpu


def test_tap_counts_in_cuda_graph_replays() -> None:
    model = TinyMoE(TinyMoEConfig(first_dense_layers=1, seed=2)).cuda().eval()
    x = torch.randint(0, 256, (4, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    att = attach(model)
    rec = att.recorder
    assert rec.device.type == "cuda"
    rec.start()
    with torch.no_grad():
        eager = model(x)
        once = rec.dump()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
            model(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(x)
    rec.start()  # a fresh window: the warm-up pass is not counted
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    dump = rec.dump()
    assert torch.equal(out, eager)
    assert dump.window.num_passes == 3
    assert torch.equal(dump.total_count(), 3 * once.total_count())
    rec.stop()  # the device flag: replays record nothing while stopped
    graph.replay()
    assert rec.dump().total_count().sum() == 0
    att.detach()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_merge_equals_single_process(tmp_path: Path) -> None:
    launch(2, ["replicas", "shards"], tmp_path, backend="nccl")
    check_merges(2, ["replicas", "shards"], tmp_path, device="cuda")
