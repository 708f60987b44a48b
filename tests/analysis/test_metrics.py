"""Imbalance metrics against hand-computed values, and the properties every metric must have."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_record_sdk.analysis import metrics as m

ALL = {
    "max_over_mean": m.max_over_mean,
    "imbalance_ratio": m.imbalance_ratio,
    "balancedness": m.balancedness,
    "jain": m.jain,
    "cv": m.cv,
}


def test_hand_computed_values():
    x = torch.tensor([6, 2, 0, 0])  # mean 2, max 6, sum 8, sum of squares 40, population std sqrt(6)
    assert m.max_over_mean(x).item() == pytest.approx(3.0)
    assert m.imbalance_ratio(x).item() == pytest.approx(2.0)
    assert m.balancedness(x).item() == pytest.approx((2 + 1e-5) / (6 + 1e-5))
    assert m.jain(x).item() == pytest.approx(64 / (4 * 40))
    assert m.cv(x).item() == pytest.approx(math.sqrt(6) / 2)
    assert m.dead_experts(x) == [2, 3]
    assert m.hot_experts(x, top=3) == [(0, pytest.approx(3.0))]  # 2 is not above the mean


def test_batched_over_leading_axes():
    x = torch.tensor([[[1, 1], [3, 1]], [[0, 4], [2, 2]]])
    assert m.imbalance_ratio(x).tolist() == [[0.0, 0.5], [1.0, 0.0]]


@pytest.mark.parametrize("n", [1, 2, 7, 256])
def test_uniform_load_is_perfect(n):
    x = torch.full((n,), 37)
    assert m.max_over_mean(x).item() == pytest.approx(1.0)
    assert m.imbalance_ratio(x).item() == pytest.approx(0.0)
    assert m.balancedness(x).item() == pytest.approx(1.0)
    assert m.jain(x).item() == pytest.approx(1.0)
    assert m.cv(x).item() == pytest.approx(0.0)
    assert m.dead_experts(x) == [] and m.hot_experts(x) == []


@pytest.mark.parametrize("n", [2, 8, 256])
def test_one_hot_expert_is_worst(n):
    x = torch.zeros(n, dtype=torch.int64)
    x[n // 2] = 1000
    assert m.max_over_mean(x).item() == pytest.approx(n)
    assert m.imbalance_ratio(x).item() == pytest.approx(n - 1)
    assert m.balancedness(x).item() == pytest.approx((1000 / n + 1e-5) / (1000 + 1e-5))  # ~1/n
    assert m.jain(x).item() == pytest.approx(1 / n)
    assert m.cv(x).item() == pytest.approx(math.sqrt(n - 1))
    assert m.dead_experts(x) == [i for i in range(n) if i != n // 2]
    assert m.hot_experts(x) == [(n // 2, pytest.approx(n))]


def test_empty_load_has_no_ratio_but_sglang_balancedness_is_one():
    x = torch.zeros(4)
    for name in ("max_over_mean", "imbalance_ratio", "jain", "cv"):
        assert math.isnan(ALL[name](x).item()), name
    assert m.balancedness(x).item() == 1.0  # SGLang's (0 + 1e-5) / (0 + 1e-5)


def test_shape_errors_name_the_problem():
    with pytest.raises(ValueError, match="n >= 1"):
        m.jain(torch.zeros(3, 0))


loads = st.lists(st.integers(0, 10_000), min_size=1, max_size=40).filter(lambda v: sum(v) > 0)


@settings(max_examples=200, deadline=None)
@given(loads, st.integers(1, 50), st.randoms(use_true_random=False))
def test_metrics_are_bounded_and_invariant(values, scale, rnd):
    x = torch.tensor(values)
    n = len(values)
    # the same total, all on one entry / spread evenly (SGLang's smoothing depends on the scale)
    one_hot = torch.zeros(n, dtype=torch.float64)
    one_hot[0] = sum(values)
    uniform = torch.full((n,), sum(values) / n, dtype=torch.float64)
    shuffled = x[torch.tensor(rnd.sample(range(n), n))]
    for name, f in ALL.items():
        v = f(x).item()
        # scale and order do not matter (balancedness only up to its 1e-5 smoothing)
        tol = 1e-4 if name == "balancedness" else 1e-9
        assert f(x * scale).item() == pytest.approx(v, rel=tol, abs=tol), name
        assert f(shuffled).item() == pytest.approx(v), name
        # between the perfect (uniform) and the worst (one hot) score
        lo, hi = sorted([f(uniform).item(), f(one_hot).item()])
        assert lo - 1e-6 <= v <= hi + 1e-6, (name, v, lo, hi)
    assert m.max_over_mean(x).item() == pytest.approx(m.imbalance_ratio(x).item() + 1)
    together = m.all_metrics(x)  # the one-pass version the summaries use agrees with each function
    for name, f in ALL.items():
        assert together[name].item() == pytest.approx(f(x).item(), rel=1e-9, abs=1e-12), name


def test_gpu_loads_contiguous_and_through_a_map():
    load = torch.tensor([[8, 0, 2, 2]])
    assert m.gpu_loads(load, num_gpus=2).tolist() == [[8.0, 4.0]]
    # expert 0 on two slots, split evenly; slots 0,1 on GPU 0 and 2,3... on GPU 1
    mapping = torch.tensor([[0, 1, 0, 2, 3, 3]])
    assert m.gpu_loads(load, num_gpus=2, physical_to_logical_map=mapping).tolist() == [[4.0 + 0 + 4.0, 2.0 + 1.0 + 1.0]]
    # leading axes (passes) broadcast
    both = m.gpu_loads(torch.stack([load, load * 2]), num_gpus=3, physical_to_logical_map=mapping)
    assert both.shape == (2, 1, 3) and both[1].tolist() == [[8.0, 12.0, 4.0]]
    with pytest.raises(ValueError, match="divide"):
        m.gpu_loads(load, num_gpus=3)
    with pytest.raises(ValueError, match=r"entries must be in \[0, 4\)"):
        m.gpu_loads(load, num_gpus=1, physical_to_logical_map=torch.tensor([[0, 1, 2, 4]]))
    assert m.physical_gpu_loads(torch.tensor([[1, 2, 3, 4, 5, 6]]), 3).tolist() == [[3.0, 7.0, 11.0]]


def test_gpu_loads_refuse_what_would_lose_or_invent_load():
    load = torch.tensor([[8, 0, 2, 2]])
    mapping = torch.tensor([[0, 1, 2, 3]])
    for n in (0, -2):
        with pytest.raises(ValueError, match=f"num_gpus: {n}; expected a GPU count >= 1"):
            m.gpu_loads(load, num_gpus=n)
        with pytest.raises(ValueError, match=f"num_gpus: {n}; expected a GPU count >= 1"):
            m.gpu_loads(load, num_gpus=n, physical_to_logical_map=mapping)
        with pytest.raises(ValueError, match=f"num_gpus: {n}; expected a GPU count >= 1"):
            m.physical_gpu_loads(load, n)
    # expert 3 has no slot: its 2 tokens would vanish from every GPU
    with pytest.raises(ValueError, match=r"layer 0 has no slot for expert 3, which got 2 token\(s\)"):
        m.gpu_loads(load, num_gpus=2, physical_to_logical_map=torch.tensor([[0, 1, 2, 2]]))
    # summed over leading axes (passes): expert 3 is loaded in the second pass only
    passes = torch.stack([torch.tensor([[8, 0, 2, 0]]), load])
    with pytest.raises(ValueError, match="expert 3, which got 2 token"):
        m.gpu_loads(passes, num_gpus=2, physical_to_logical_map=torch.tensor([[0, 1, 2, 2]]))
    # an expert without a slot but also without load loses nothing
    assert m.gpu_loads(load, num_gpus=2, physical_to_logical_map=torch.tensor([[0, 0, 2, 3]])).tolist() == [[8.0, 4.0]]
    with pytest.raises(ValueError, match=r"expected an int tensor \[layers, physical slots\], got torch.float32"):
        m.gpu_loads(load, num_gpus=2, physical_to_logical_map=mapping.float())
