"""Real transformers 5.x MoE models (small configs, random weights): counts from ``generate()``
equal a reference computed, in the test, from the router logits transformers itself returns
(``output_router_logits=True``), exactly, per layer and expert."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import transformers as T
from moe_record_torch import attach, layer_map
from test_tap import Boom, RouterLog, raise_at_calls  # this folder is on sys.path (pytest rootdir-relative import)

COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=0,
)
E, K = 8, 2


def _softmax_topk(logits: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float32), K, dim=-1).indices


def _logit_topk(logits: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.topk(logits, K, dim=-1).indices


def _grouped_topk(n_group: int, topk_group: int):
    """DeepSeek-V3 routing (paper, §2.1.2): sigmoid scores + correction bias; keep the
    ``topk_group`` groups with the best two-expert sums; top-k experts within them."""

    def choose(logits: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        assert bias is not None
        scores = logits.sigmoid() + bias
        grouped = scores.view(-1, n_group, E // n_group)
        best_groups = grouped.topk(2, dim=-1).values.sum(-1).topk(topk_group, dim=-1).indices
        keep = torch.zeros(scores.shape[0], n_group, dtype=torch.bool).scatter_(1, best_groups, True)
        masked = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(-1, E)
        return masked.topk(K, dim=-1).indices

    return choose


def _sigmoid_bias_topk(logits: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """AFMoE routing: top-k of sigmoid scores plus the expert bias (the bias only chooses)."""
    assert bias is not None
    return torch.topk(logits.sigmoid() + bias, K, dim=-1).indices


@dataclass(frozen=True)
class Family:
    config: Callable[[], Any]
    moe_layers: list[int]  # the MoE decoder layers as the config defines them
    choose: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]  # top-k rule over the logits
    router: str = "mlp.gate"  # the router module, in each MoE decoder layer
    logits: int | None = 0  # where its output holds the logits (None: the output is the logits)
    bias: str | None = None  # a routing bias the rule needs, in each MoE decoder layer


FAMILIES = {
    "qwen3_moe": Family(
        lambda: T.Qwen3MoeConfig(
            **COMMON, head_dim=8, moe_intermediate_size=16, num_experts=E, num_experts_per_tok=K, mlp_only_layers=[1]
        ),
        [0, 2, 3],
        _softmax_topk,
    ),
    "qwen2_moe": Family(
        lambda: T.Qwen2MoeConfig(
            **COMMON,
            moe_intermediate_size=16,
            shared_expert_intermediate_size=16,
            num_experts=E,
            num_experts_per_tok=K,
            mlp_only_layers=[0],
        ),
        [1, 2, 3],
        _softmax_topk,
    ),
    "mixtral": Family(
        lambda: T.MixtralConfig(**COMMON, head_dim=8, num_local_experts=E, num_experts_per_tok=K),
        [0, 1, 2, 3],
        _softmax_topk,
    ),
    "olmoe": Family(lambda: T.OlmoeConfig(**COMMON, num_experts=E, num_experts_per_tok=K), [0, 1, 2, 3], _softmax_topk),
    "deepseek_v3": Family(
        lambda: T.DeepseekV3Config(
            **{**COMMON, "num_key_value_heads": 4},
            moe_intermediate_size=16,
            n_routed_experts=E,
            num_experts_per_tok=K,
            n_group=4,
            topk_group=2,
            first_k_dense_replace=1,
            n_shared_experts=1,
            kv_lora_rank=16,
            q_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
        ),
        [1, 2, 3],
        _grouped_topk(4, 2),
        bias="mlp.gate.e_score_correction_bias",
    ),
    "gpt_oss": Family(
        lambda: T.GptOssConfig(**COMMON, head_dim=8, num_local_experts=E, num_experts_per_tok=K),
        [0, 1, 2, 3],
        _logit_topk,
        router="mlp.router",
    ),
    "hunyuan_v1_moe": Family(
        lambda: T.HunYuanMoEV1Config(**COMMON, head_dim=8, num_experts=E, moe_topk=K), [0, 1, 2, 3], _softmax_topk
    ),
    "gemma4": Family(  # its router returns probabilities first
        lambda: T.Gemma4TextConfig(
            **{**COMMON, "layer_types": ["sliding_attention", "full_attention"] * 2},
            head_dim=8,
            enable_moe_block=True,
            moe_intermediate_size=16,
            num_experts=E,
            top_k_experts=K,
        ),
        [0, 1, 2, 3],
        _logit_topk,
        router="router",
    ),
    "afmoe": Family(
        lambda: T.AfmoeConfig(
            **COMMON, head_dim=8, moe_intermediate_size=16, num_experts=E, num_experts_per_tok=K, num_dense_layers=1
        ),
        [1, 2, 3],
        _sigmoid_bias_topk,
        router="mlp.router",
        bias="mlp.expert_bias",
    ),
    "llama4": Family(
        lambda: T.Llama4TextConfig(
            **COMMON,
            head_dim=8,
            intermediate_size_mlp=48,
            num_local_experts=E,
            num_experts_per_tok=K,
            interleave_moe_layer_step=2,
        ),
        [1, 3],
        _logit_topk,
        router="feed_forward.router",
        logits=1,  # (scores, logits)
    ),
    "jamba": Family(  # Mamba and attention layers; the MoE block routes through a plain Linear
        lambda: T.JambaConfig(
            **COMMON,
            num_experts=E,
            num_experts_per_tok=K,
            expert_layer_period=2,
            expert_layer_offset=1,
            attn_layer_period=2,  # one attention layer at least: generate()'s cache needs one
            attn_layer_offset=1,
        ),
        [1, 3],
        _softmax_topk,
        router="feed_forward.router",
        logits=None,
    ),
}


def _model(family: str, seed: int = 0) -> tuple[torch.nn.Module, list[int], object, list[torch.Tensor | None]]:
    f = FAMILIES[family]
    config = f.config()
    config.output_router_logits = True  # transformers returns every MoE layer's router logits
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(config).eval()
    biases: list[torch.Tensor | None] = [None] * len(f.moe_layers)
    if f.bias:  # a non-zero routing bias, so the reference must use it to match
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for i, layer in enumerate(f.moe_layers):
                owner, _, name = f"model.layers.{layer}.{f.bias}".rpartition(".")
                buf = getattr(model.get_submodule(owner), name)
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.05)
                biases[i] = buf.detach().clone()
    return model, f.moe_layers, f.choose, biases


def _routers(model: torch.nn.Module, family: str, layers: list[int]) -> dict[int, torch.nn.Module]:
    return {layer: model.get_submodule(f"model.layers.{layer}.{FAMILIES[family].router}") for layer in layers}


def _reference(router_logits_per_pass, moe_layers, choose, biases, num_layers, valid_rows=None) -> torch.Tensor:
    want = torch.zeros(num_layers, E, dtype=torch.int64)
    for p, logits_of_layer in enumerate(router_logits_per_pass):
        assert len(logits_of_layer) == len(moe_layers)
        for layer, logits, bias in zip(moe_layers, logits_of_layer, biases):
            ids = choose(logits.float(), bias)
            if valid_rows is not None and valid_rows[p] is not None:
                ids = ids[valid_rows[p]]
            want[layer] += torch.bincount(ids.reshape(-1), minlength=E)
    return want


def _capture_router_logits(model, family, moe_layers) -> tuple[list[tuple[torch.Tensor, ...]], object]:
    """Per forward pass, the router logits of each MoE layer: those transformers returns
    (``output_router_logits``), or, where a release returns none (DeepseekV3 in 5.17), those the
    test's own hooks read from the router modules' output."""
    seen: list[tuple[torch.Tensor, ...]] = []
    pending: list[torch.Tensor] = []
    at = FAMILIES[family].logits

    def on_router(module, args, out) -> None:
        pending.append((out if at is None else out[at]).detach().clone())

    def on_model(module, args, out) -> None:
        returned = getattr(out, "router_logits", None)
        if returned is not None:
            assert all(torch.equal(a, b) for a, b in zip(returned, pending, strict=True))
        seen.append(tuple(returned) if returned is not None else tuple(pending))
        pending.clear()

    routers = _routers(model, family, moe_layers).values()
    handles = [r.register_forward_hook(on_router) for r in routers] + [model.register_forward_hook(on_model)]
    return seen, lambda: [h.remove() for h in handles]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generate_counts_equal_router_logits_reference(family: str) -> None:
    model, moe_layers, choose, biases = _model(family)
    lm = layer_map(model)
    assert lm.moe_layer_ids == tuple(moe_layers) and lm.num_layers == 4
    assert (lm.num_experts, lm.top_k) == (E, K)

    seen, stop_capture = _capture_router_logits(model, family, moe_layers)
    att = attach(model)
    att.recorder.start()
    prompt = torch.randint(1, COMMON["vocab_size"], (1, 7), generator=torch.Generator().manual_seed(3))
    out = model.generate(prompt, max_new_tokens=6, do_sample=False)
    dump = att.recorder.dump()
    att.detach()
    stop_capture()

    assert out.shape == (1, 13)
    assert len(seen) == 6 == dump.window.num_passes  # one pass per generate step
    want = _reference(seen, moe_layers, choose, biases, 4)
    assert want.sum() == (7 + 5) * K * len(moe_layers)
    assert torch.equal(dump.total_count(), want)
    assert dump.model.moe_layer_ids == moe_layers
    assert dump.window.num_tokens == [12 if layer in moe_layers else 0 for layer in range(4)]
    assert dump.engine.name == "transformers" and dump.engine.version == T.__version__


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_a_generate_that_raises_part_way_ends_a_pass_of_its_own(family: str) -> None:
    """generate() whose third forward raises in decoder layer 2 (of 4), then a generate() that
    completes: per_pass rows equal, call by call, the top-k the test computes from each
    router's logits; the failed step is a pass of its own (layers up to 2), and the exception
    reaches the caller unchanged."""
    model, moe_layers, choose, biases = _model(family, seed=2)
    model.config.output_router_logits = False
    bias_of = dict(zip(moe_layers, biases, strict=True))
    routers = _routers(model, family, moe_layers)
    log = RouterLog(model, routers, lambda layer, logits: choose(logits.float(), bias_of[layer]))
    boom = Boom("decoder layer 2 failed")
    failing = raise_at_calls(model.get_submodule("model.layers.2"), {2}, boom)
    g = torch.Generator().manual_seed(4)
    first, second = (torch.randint(1, COMMON["vocab_size"], shape, generator=g) for shape in ((2, 5), (1, 4)))
    with attach(model, mode="per_pass") as att:
        att.recorder.start()
        with pytest.raises(Boom) as raised:
            model.generate(first, max_new_tokens=6, do_sample=False)
        assert raised.value is boom
        failing.remove()
        model.generate(second, max_new_tokens=3, do_sample=False)
        dump = att.recorder.dump()
    log.remove()

    want = log.counts(4, E)
    assert dump.window.num_passes == len(want) == 3 + 3
    assert torch.equal(dump.logical_count, want)
    # The failed decode step: its 2 rows in the MoE layers up to 2, none in layer 3.
    assert [int(want[2, layer].sum()) for layer in moe_layers] == [2 * K, 2 * K, 0]
    assert dump.total_logical_count is None
    # Rows: 2 x 5 prompt, 2 + 2 (failed) decoded; 4 prompt, 1 + 1 decoded.
    assert dump.window.num_tokens == [20 if layer in moe_layers else 0 for layer in range(3)] + [18]


def test_padding_rows_are_not_counted() -> None:
    """A left-padded batch: rows whose attention_mask is 0 are left out, the rest count exactly."""
    model, moe_layers, choose, biases = _model("qwen3_moe", seed=5)
    g = torch.Generator().manual_seed(9)
    prompt = torch.randint(1, COMMON["vocab_size"], (3, 6), generator=g)
    mask = torch.ones(3, 6, dtype=torch.int64)
    mask[0, :4] = 0  # lengths 2, 6, 5
    mask[2, :1] = 0
    prompt = prompt.masked_fill(mask == 0, 0)
    real = int(mask.sum())
    valid = mask.reshape(-1).bool()

    # One forward of the padded batch: the logits transformers returns, masked, are the reference.
    with attach(model, mode="per_token") as att:
        att.recorder.start()
        out = model(prompt, attention_mask=mask)
        dump = att.recorder.dump()
    want = _reference([out.router_logits], moe_layers, choose, biases, 4, [valid])
    assert torch.equal(dump.total_count(), want)
    assert dump.window.num_tokens == [real if layer in moe_layers else 0 for layer in range(4)]
    assert dump.window.discarded == [0, 0, 0, 0]
    # per_token: the record holds the real tokens only, in order, with the model's ids.
    ids = dump.records[0].topk_ids_of_layer
    assert ids.shape == (4, real, K)
    for i, layer in enumerate(moe_layers):
        assert torch.equal(ids[layer].to(torch.int64), choose(out.router_logits[i], None)[valid])

    # generate(): decode steps see the mask's last column; every decoded row is real.
    # (transformers' aux loss fails on cached decode steps with a mask, so no router logits here.)
    model.config.output_router_logits = False
    with attach(model) as att:
        att.recorder.start()
        model.generate(prompt, attention_mask=mask, max_new_tokens=4, do_sample=False)
        dump = att.recorder.dump()
    assert dump.window.num_passes == 4
    assert dump.window.num_tokens == [real + 3 * 3 if layer in moe_layers else 0 for layer in range(4)]
    assert dump.total_count().sum() == (real + 9) * K * len(moe_layers)

    # The mask given by position counts the same (it was ignored: padding counted).
    with attach(model) as att:
        att.recorder.start()
        model(prompt, mask)
        assert att.recorder.dump().window.num_tokens == [real if layer in moe_layers else 0 for layer in range(4)]

    # mask_padding=False counts every row.
    with attach(model, mask_padding=False) as att:
        att.recorder.start()
        model(prompt, attention_mask=mask)
        assert att.recorder.dump().window.num_tokens[moe_layers[0]] == 18


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_a_static_cache_generate_leaves_padding_out_too(family: str, side: str) -> None:
    """With a static cache generate() calls the model with a 4-D mask (GptOss: one per attention
    type) that it builds itself: padding must still be left out, exactly as with the 2-D mask."""
    model, _, _, _ = _model(family, seed=4)
    model.config.output_router_logits = False
    mask = torch.ones(3, 6, dtype=torch.int64)
    if side == "left":
        mask[0, :4], mask[2, :2] = 0, 0
    else:
        mask[0, 2:], mask[2, 4:] = 0, 0
    prompt = torch.randint(1, COMMON["vocab_size"], (3, 6), generator=torch.Generator().manual_seed(2))
    prompt = prompt.masked_fill(mask == 0, 0)
    dumps = {}
    for cache in ("dynamic", "static"):
        with attach(model, mode="per_token") as att:
            att.recorder.start()
            model.generate(prompt, attention_mask=mask, max_new_tokens=3, do_sample=False, cache_implementation=cache)
            dumps[cache] = att.recorder.dump()
    real = int(mask.sum()) + 2 * 3
    assert real in dumps["static"].window.num_tokens and set(dumps["static"].window.num_tokens) <= {0, real}
    assert torch.equal(dumps["static"].total_count(), dumps["dynamic"].total_count())
    for a, b in zip(dumps["static"].records, dumps["dynamic"].records, strict=True):
        assert torch.equal(a.topk_ids_of_layer, b.topk_ids_of_layer)


def test_gradient_checkpointing_recompute_is_not_counted_again() -> None:
    """Checkpointed layers run their routers again during backward: one training step still
    counts each real token once per MoE layer."""
    model, moe_layers, _, _ = _model("qwen3_moe", seed=6)
    model.config.output_router_logits = False
    mask = torch.ones(2, 6, dtype=torch.int64)
    mask[0, :3] = 0
    prompt = torch.randint(1, COMMON["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(1))
    counts = {}
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        with attach(model) as att:
            att.recorder.start()
            model(prompt, attention_mask=mask, labels=prompt).loss.backward()
            dump = att.recorder.dump()
        assert dump.window.num_passes == 1
        assert dump.window.num_tokens == [9 if layer in moe_layers else 0 for layer in range(4)]
        counts[checkpointing] = dump.total_count()
    assert torch.equal(counts[True], counts[False])


def test_an_extract_that_does_not_fit_the_router_is_named() -> None:
    from moe_record_torch import ids_at

    from moe_record_sdk.errors import AdapterError

    model, moe_layers, _, _ = _model("qwen3_moe")
    routers = _routers(model, "qwen3_moe", moe_layers)
    with attach(model, routers=routers, extract=ids_at(5), num_experts=E, top_k=K) as att:
        att.recorder.start()
        with pytest.raises(AdapterError, match=r"layer \d: extract could not take the top-k ids from .*IndexError"):
            model(torch.tensor([[1, 2, 3]]))
    with pytest.raises(AdapterError, match=r"layers: \[\] selects none of"):
        attach(model, layers=[])


def test_deepseek_v4_hash_routed_layers_are_counted() -> None:
    """DeepSeek-V4's first MoE layers route by a token-id table (``DeepseekV4HashRouter``): they
    are found with the learned routers (they were skipped, their tokens missing from the counts)."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    config = CONFIG_MAPPING["deepseek_v4"](
        vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
        head_dim=8, max_position_embeddings=128, moe_intermediate_size=16, num_local_experts=8,
        num_experts_per_tok=2, q_lora_rank=16, qk_rope_head_dim=8, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        mlp_layer_types=["hash_moe", "moe", "moe"],
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    hash_router = model.model.layers[0].mlp.gate
    assert type(hash_router).__name__ == "DeepseekV4HashRouter"
    hash_router.tid2eid.copy_(
        torch.randint(0, 8, hash_router.tid2eid.shape, generator=torch.Generator().manual_seed(1))
    )
    att = attach(model)
    assert list(att.layer_map.moe_layer_ids) == [0, 1, 2], att.layer_map
    assert att.recorder.num_experts == 8, att.layer_map
    ids = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(2))
    att.recorder.start()
    with torch.no_grad():
        model(ids)
    counts = att.recorder.dump().total_count()
    assert torch.equal(counts[0], torch.bincount(hash_router.tid2eid[ids.flatten()].flatten(), minlength=8))
    assert counts.sum(1).tolist() == [2 * 7 * 2] * 3
    att.detach()


def test_routers_in_a_layer_that_holds_a_list_take_the_layer_index() -> None:
    """Switch-Transformers: ``encoder.block.N.layer.M.mlp.router``. The layer is N (the block),
    not M (the sub-layer): both sparse blocks used to read as layer 1 and were refused."""
    config = T.SwitchTransformersConfig(
        vocab_size=64, d_model=32, d_ff=48, d_kv=8, num_heads=4, num_layers=4, num_decoder_layers=4,
        num_sparse_encoder_layers=2, num_sparse_decoder_layers=2, num_experts=8, decoder_start_token_id=0,
    )  # fmt: skip
    model = T.SwitchTransformersModel(config).eval()
    routers = [n for n, _ in model.named_modules() if n.startswith("encoder") and n.endswith(".router")]
    assert routers == ["encoder.block.1.layer.1.mlp.router", "encoder.block.3.layer.1.mlp.router"]
    lm = layer_map(model, routers="encoder.*.router", num_experts=8, top_k=1)
    assert (lm.num_layers, list(lm.moe_layer_ids)) == (4, [1, 3])
