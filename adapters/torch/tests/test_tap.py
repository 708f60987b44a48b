"""The torch adapter on the built-in TinyMoE and on hand-written models (explicit form)."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
from moe_record_torch import attach, ids_at, layer_map, topk_of_logits
from moe_record_torch.tiny import TinyMoE, TinyMoEConfig
from torch import nn

from moe_record_sdk import Recorder, validate_dump
from moe_record_sdk.errors import AdapterError
from moe_record_sdk.plugins import AdapterRegistry


def _prompt(seed: int, shape=(2, 7), vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _router_reference(model: TinyMoE, run) -> tuple[torch.Tensor, int]:
    """Counts from the routers' own outputs, captured by hooks of the test, and the pass count."""
    cfg = model.config
    want = torch.zeros(cfg.num_layers, cfg.num_experts, dtype=torch.int64)
    calls = []

    def count(i: int):
        def hook(module, args, out) -> None:
            ids = torch.topk(out[0].softmax(-1), cfg.top_k).indices  # from the logits, not the ids
            want[i] += torch.bincount(ids.reshape(-1), minlength=cfg.num_experts)

        return hook

    handles = [
        layer.mlp.gate.register_forward_hook(count(i))
        for i, layer in enumerate(model.layers)
        if i >= cfg.first_dense_layers
    ]
    handles.append(model.register_forward_hook(lambda *a: calls.append(1)))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return want, len(calls)


class Boom(Exception):
    """What a test's hook raises from inside a model."""


class RouterLog:
    """The test's own per-pass reference: every call of ``model`` opens a pass (its pre-hook,
    however the call ends), and each router's top-k ids, chosen by ``choose(layer, logits)`` from
    the logits it returns, land in the pass of the call that ran it."""

    def __init__(
        self, model: nn.Module, routers: dict[int, nn.Module], choose: Callable[[int, torch.Tensor], torch.Tensor]
    ) -> None:
        self.passes: list[dict[int, torch.Tensor]] = []

        def on_router(layer: int):
            def hook(module, args, out) -> None:
                self.passes[-1][layer] = choose(layer, out[0].detach()).to(torch.int64)

            return hook

        self.handles = [model.register_forward_pre_hook(lambda *_: self.passes.append({}))]
        self.handles += [r.register_forward_hook(on_router(layer)) for layer, r in routers.items()]

    def counts(self, num_layers: int, num_experts: int) -> torch.Tensor:
        """int64 [passes, layers, experts]."""
        out = torch.zeros(len(self.passes), num_layers, num_experts, dtype=torch.int64)
        for p, ids_of in enumerate(self.passes):
            for layer, ids in ids_of.items():
                out[p, layer] = torch.bincount(ids.reshape(-1), minlength=num_experts)
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def raise_at_calls(module: nn.Module, calls: set[int], error: BaseException):
    """A forward hook on ``module`` that raises ``error`` at those of its calls (0-based)."""
    seen = itertools.count()

    def hook(*_) -> None:
        if next(seen) in calls:
            raise error

    return module.register_forward_hook(hook)


def _tiny_log(model: TinyMoE) -> RouterLog:
    cfg = model.config
    routers = {i: layer.mlp.gate for i, layer in enumerate(model.layers) if i >= cfg.first_dense_layers}
    return RouterLog(model, routers, lambda layer, logits: torch.topk(logits.softmax(-1), cfg.top_k).indices)


def test_tiny_generate_counts_and_layer_numbering() -> None:
    model = TinyMoE(TinyMoEConfig(num_layers=4, first_dense_layers=1, seed=3))
    lm = layer_map(model)
    assert (lm.num_layers, lm.moe_layer_ids, lm.num_experts, lm.top_k) == (4, (1, 2, 3), 16, 2)
    att = attach(model)
    att.recorder.start()
    prompt = _prompt(1)
    want, passes = _router_reference(model, lambda: model.generate(prompt, max_new_tokens=5))
    dump = att.recorder.dump()
    att.detach()
    assert passes == 5 == dump.window.num_passes
    assert torch.equal(dump.total_count(), want)
    assert dump.window.num_tokens == [0, 22, 22, 22]  # 2 x 7 prompt rows + 4 decode steps x 2 rows
    assert dump.total_count()[0].sum() == 0 and validate_dump(dump) == []
    assert dump.engine.name == "torch" and dump.engine.adapter == "moe-record-torch"


def test_tiny_is_seeded_and_deterministic() -> None:
    a, b, c = TinyMoE(TinyMoEConfig(seed=1)), TinyMoE(TinyMoEConfig(seed=1)), TinyMoE(TinyMoEConfig(seed=2))
    x = _prompt(0)
    assert torch.equal(a.generate(x, 4), b.generate(x, 4))
    assert not torch.equal(a(x), c(x))
    # The cache gives the same logits as recomputing the whole sequence.
    full = a(torch.cat([x, x[:, :2]], 1))[:, -1]
    from moe_record_torch.tiny import TinyCache

    cache = TinyCache()
    a(x, cache)
    assert torch.allclose(a(x[:, :2], cache)[:, -1], full, atol=1e-5)


def test_detach_restores_the_model_exactly() -> None:
    model = TinyMoE(TinyMoEConfig(seed=4, first_dense_layers=1))
    x = _prompt(2)

    def hooks():
        return {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()}

    before_hooks, before = hooks(), model(x)
    att = attach(model)
    att.recorder.start()
    during = model(x)
    with pytest.raises(AdapterError, match="already attached"):
        attach(model)
    with pytest.raises(AdapterError, match="already attached"):
        attach(model.layers[2], routers="mlp.gate", num_experts=16, top_k=2)
    att.detach()
    att.detach()  # idempotent
    assert hooks() == before_hooks
    assert torch.equal(model(x), before) and torch.equal(during, before)
    assert att.recorder.dump().window.num_passes == 1  # nothing after detach
    attach(model).detach()  # attachable again


@pytest.mark.parametrize(("mode", "options"), [("per_pass", {}), ("per_token", {}), ("stat", {"buffer_size": 16})])
def test_a_forward_that_raises_ends_a_pass_of_its_own(mode: str, options: dict) -> None:
    """A call that raises in layer 2 of 4 (alone, or inside generate()): the layers it recorded
    are a pass of their own, the next call's pass holds that call only, and the exception
    reaches the caller unchanged."""
    model = TinyMoE(TinyMoEConfig(num_layers=4, seed=7))
    log = _tiny_log(model)
    boom = Boom("layer 2 failed")
    # Layer 2's calls: 0 first call, 1 the failing one, 2 the next, 3-5 generate()'s (5 fails).
    failing = raise_at_calls(model.layers[2], {1, 5}, boom)
    att = attach(model, mode=mode, **options)
    att.recorder.start()
    model(_prompt(1))
    with pytest.raises(Boom) as raised:
        model(_prompt(2, (3, 4)))
    assert raised.value is boom
    model(_prompt(3))
    with pytest.raises(Boom):
        model.generate(_prompt(4), max_new_tokens=6)  # its third forward fails
    failing.remove()
    model.generate(_prompt(5), max_new_tokens=3)
    dump = att.recorder.dump()
    att.detach()
    log.remove()

    want = log.counts(4, 16)
    assert dump.window.num_passes == len(want) == 9
    assert torch.equal(dump.logical_count, want)
    for p, tokens in ((1, 12), (5, 2)):  # the failed passes: layers 0-2 of their tokens, layer 3 nothing
        assert want[p, :3].sum(-1).tolist() == [tokens * 2] * 3 and want[p, 3].sum() == 0
    assert dump.total_logical_count is None and validate_dump(dump) == []
    if mode == "per_token":
        for record, ids_of in zip(dump.records, log.passes, strict=True):
            for layer in range(4):  # the failed pass's layer 3 ran no router: no ids
                ids = record.topk_ids_of_layer[layer].to(torch.int64)
                assert torch.equal(ids, ids_of.get(layer, torch.full_like(ids, -1)))


def test_an_interrupted_forward_is_ended_by_the_next_call_or_detach() -> None:
    """KeyboardInterrupt is a BaseException, for which PyTorch runs no hook: the interrupted
    call's layers become a pass of their own when the next call begins, or at detach."""
    model = TinyMoE(TinyMoEConfig(num_layers=4, first_dense_layers=1, seed=8))
    log = _tiny_log(model)
    interrupt = KeyboardInterrupt()
    failing = raise_at_calls(model.layers[2], {1, 3}, interrupt)
    att = attach(model, mode="per_pass")
    rec = att.recorder
    rec.start()
    model(_prompt(1))
    with pytest.raises(KeyboardInterrupt) as raised:
        model(_prompt(2))
    assert raised.value is interrupt
    model(_prompt(3, (1, 5)))
    with pytest.raises(KeyboardInterrupt):
        model(_prompt(4))
    att.detach()
    failing.remove()
    model(_prompt(5))  # detached: not recorded
    log.remove()
    dump = rec.dump()
    want = log.counts(4, 16)[:4]
    assert dump.window.num_passes == 4
    assert torch.equal(dump.logical_count, want)
    assert want[1, 3].sum() == want[3, 3].sum() == 0 and want[1, 2].sum() == 14 * 2
    assert dump.total_logical_count is None


def test_checkpointing_the_whole_model_adds_no_pass() -> None:
    """Non-reentrant checkpointing of the top module calls it again in backward, and stops that
    call early by raising once it has what it needs: neither is a pass or adds a count."""
    from torch.utils.checkpoint import checkpoint

    model = TinyMoE(TinyMoEConfig(num_layers=3, seed=9))
    log = _tiny_log(model)
    with attach(model, mode="per_pass") as att:
        att.recorder.start()
        checkpoint(model, _prompt(6), use_reentrant=False).square().mean().backward()
        dump = att.recorder.dump()
    log.remove()
    assert len(log.passes) == 2  # the forward and its recompute
    assert dump.window.num_passes == 1
    assert torch.equal(dump.logical_count[0], log.counts(3, 16)[0])


def test_explicit_form_on_a_hand_written_model() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.router = nn.Linear(8, 6, bias=False)

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            ids = torch.topk(self.router(h), 3, dim=-1).indices  # top-k inline, in the model's code
            return h + ids.sum(-1, keepdim=True).to(h.dtype) * 0.01

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.blocks = nn.ModuleList(Block() for _ in range(3))

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            for b in self.blocks:
                h = b(h)
            return h

    net = Net()
    h = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    want = torch.zeros(3, 6, dtype=torch.int64)
    x = h
    for i, b in enumerate(net.blocks):
        want[i] = torch.bincount(torch.topk(b.router(x), 3).indices.reshape(-1), minlength=6)
        x = b(x)

    for routers in ("blocks.*.router", [b.router for b in net.blocks], {i: b.router for i, b in enumerate(net.blocks)}):
        with attach(net, routers=routers, extract=topk_of_logits(3), num_experts=6, top_k=3) as att:
            att.recorder.start()
            net(h)
            dump = att.recorder.dump()
        assert torch.equal(dump.total_count(), want), routers
        assert dump.model.num_layers == 3

    # A subset of layers (a pipeline stage), a given recorder, and its fit check.
    rec = Recorder(num_layers=3, num_experts=6, top_k=3, layer_ids=[1, 2])
    with attach(
        net, rec, routers="blocks.*.router", extract=topk_of_logits(3), num_experts=6, top_k=3, layers=[1, 2]
    ) as att:
        assert att.recorder is rec
        rec.start()
        net(h)
        assert torch.equal(rec.dump().total_count()[1:], want[1:])
    with pytest.raises(AdapterError, match="num_experts 8 != 6"):
        attach(
            net,
            Recorder(num_layers=3, num_experts=8, top_k=3),
            routers="blocks.*.router",
            extract=topk_of_logits(3),
            top_k=3,
            num_experts=6,
        )
    with pytest.raises(AdapterError, match="no submodule"):
        attach(net, routers="nothing.*", num_experts=6, top_k=3)
    with pytest.raises(AdapterError, match="no MoE router found"):
        attach(net)
    with pytest.raises(AdapterError, match="top_k"):
        attach(net, routers="blocks.*.router", num_experts=6)
    # fnmatch's * crosses dots: "blocks.*" takes the blocks and their routers, two per layer id,
    # and the error names them.
    with pytest.raises(AdapterError, match=r"blocks\.0 -> 0, blocks\.0\.router -> 0, .*also matches dots"):
        attach(net, routers="blocks.*", num_experts=6, top_k=3)


def test_ids_at_and_recorder_modes() -> None:
    model = TinyMoE(TinyMoEConfig(num_layers=2, seed=6))
    x = _prompt(3, (1, 5))
    with attach(model, routers="layers.*.mlp.gate", extract=ids_at(2), mode="per_token", buffer_size=8) as att:
        att.recorder.start()
        want, _ = _router_reference(model, lambda: model(x))
        dump = att.recorder.dump()
    assert dump.mode == "per_token" and len(dump.records) == 1
    assert torch.equal(dump.total_count(), want)
    ids = dump.records[0].topk_ids_of_layer
    assert ids.shape == (2, 5, 2) and validate_dump(dump) == []


def test_torch_compile_with_the_tap() -> None:
    """fullgraph compile (inductor) of a model with the tap and an attention mask: same counts as eager."""

    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.embed = nn.Embedding(32, 16)
            self.gates = nn.ModuleList(nn.Linear(16, 8, bias=False) for _ in range(2))
            self.experts = nn.Parameter(torch.randn(2, 8, 16, 16, generator=g) / 4)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
            h = self.embed(input_ids)
            for i, gate in enumerate(self.gates):
                w, ids = torch.topk(gate(h).softmax(-1), 2, dim=-1)
                h = h + (torch.einsum("bsh,bskho->bsko", h, self.experts[i][ids]) * w.unsqueeze(-1)).sum(-2)
            return h

    model = Toy()
    x = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 5, dtype=torch.int64)
    mask[0, :2] = 0
    att = attach(model, routers="gates.*", extract=topk_of_logits(2), num_experts=8, top_k=2)
    rec = att.recorder
    rec.start()
    with torch.no_grad():
        eager = model(x, attention_mask=mask)
    want = rec.dump()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        out = compiled(x, attention_mask=mask)
        compiled(x, attention_mask=mask)
    got = rec.dump()
    assert want.window.num_tokens == [8, 8] and got.window.num_passes == 2
    assert torch.equal(got.total_count(), 2 * want.total_count())
    assert torch.allclose(out, eager, atol=1e-5)
    att.detach()
    with torch.no_grad():
        compiled(x, attention_mask=mask)
    assert rec.dump().window.num_passes == 0  # the compiled model no longer taps


def test_registry_serves_torch_models_through_the_entry_point() -> None:
    registry = AdapterRegistry()
    torch_report = next(r for r in registry.adapters() if r.name == "torch")
    assert torch_report.status == "ok" and torch_report.info.distribution == "moe-record-torch"
    assert torch_report.engine_version == torch.__version__
    model = TinyMoE(TinyMoEConfig(num_layers=2))
    assert registry.which(model) == "torch" and registry.which(object()) is None
    assert registry.layer_map(model).moe_layer_ids == (0, 1)
    att = registry.attach(model, mode="per_pass", buffer_size=4)
    assert att.adapter == "torch" and att.recorder.mode == "per_pass"
    att.recorder.start()
    model(_prompt(4))
    assert att.recorder.dump().window.num_passes == 1
    att.detach()
    with pytest.raises(AdapterError, match="no adapter serves"):
        registry.attach(object())
