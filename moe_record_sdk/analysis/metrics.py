"""Imbalance metrics over load vectors, one function per engine's definition.

Every function takes loads ``x`` as a tensor ``[..., n]`` (tokens per expert, or per GPU) and
reduces the last axis, in float64. A perfectly even load scores ``max_over_mean = 1``,
``imbalance_ratio = 0``, ``balancedness = 1``, ``jain = 1``, ``cv = 0``; all the load on one of
``n`` entries scores the worst value each metric can take: ``n``, ``n - 1``, about ``1/n``,
``1/n`` and ``sqrt(n - 1)``. An all-zero vector has no defined ratio: NaN, except SGLang's
smoothed balancedness, which is 1 there as in SGLang.

>>> import torch
>>> imbalance_ratio(torch.tensor([3, 1, 1, 1])).item()
1.0
"""

from __future__ import annotations

import torch

#: SGLang's smoothing term in ``compute_utilization_rate`` (sglang 0.5.23
#: ``srt/eplb/expert_distribution.py``): ``(mean + 1e-5) / (max + 1e-5)``.
SGLANG_EPS = 1e-5


def _f(x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"loads: expected a tensor [..., n] with n >= 1, got shape {list(x.shape)}")
    return x.to(torch.float64)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, NaN where den is 0 (an empty load has no ratio)."""
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), torch.nan)


def max_over_mean(x: torch.Tensor) -> torch.Tensor:
    """``max / mean``: 1 when even, ``n`` when one entry takes everything."""
    x = _f(x)
    return _ratio(x.amax(-1), x.mean(-1))


def imbalance_ratio(x: torch.Tensor) -> torch.Tensor:
    """TensorRT-LLM's ``(max - mean) / mean`` (= ``max/mean - 1``): 0 when even.

    As printed by TensorRT-LLM's ``examples/wide_ep/ep_load_balancer/report_load_statistics.py``.
    """
    return max_over_mean(x) - 1.0


def balancedness(x: torch.Tensor) -> torch.Tensor:
    """SGLang's balancedness ``(mean + 1e-5) / (max + 1e-5)``: 1 when even, about ``1/n`` at worst.

    SGLang computes it over GPUs (``compute_utilization_rate``) per layer, then averages layers.
    """
    x = _f(x)
    return (x.mean(-1) + SGLANG_EPS) / (x.amax(-1) + SGLANG_EPS)


def jain(x: torch.Tensor) -> torch.Tensor:
    """Jain's fairness index ``(sum x)^2 / (n * sum x^2)``: 1 when even, ``1/n`` at worst."""
    x = _f(x)
    return _ratio(x.sum(-1) ** 2, x.shape[-1] * (x * x).sum(-1))


def cv(x: torch.Tensor) -> torch.Tensor:
    """Coefficient of variation ``std / mean`` (population std): 0 when even, ``sqrt(n-1)`` at worst."""
    x = _f(x)
    return _ratio(x.std(-1, correction=0), x.mean(-1))


def all_metrics(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every metric above at once (one pass over the data for the sums): name -> tensor ``[...]``."""
    x = _f(x)
    n = x.shape[-1]
    total, peak, squares = x.sum(-1), x.amax(-1), (x * x).sum(-1)
    mean = total / n
    var = (squares / n - mean * mean).clamp_min(0)  # population variance
    ratio = _ratio(peak, mean)
    return {
        "max_over_mean": ratio,
        "imbalance_ratio": ratio - 1.0,
        "balancedness": (mean + SGLANG_EPS) / (peak + SGLANG_EPS),
        "jain": _ratio(total * total, n * squares),
        "cv": _ratio(var.sqrt(), mean),
    }


def dead_experts(x: torch.Tensor) -> list[int]:
    """Indices of a 1-D load that were never chosen (NeMo Automodel's "dead experts")."""
    x = torch.as_tensor(x)
    return [int(i) for i in torch.nonzero(x == 0).flatten()]


def hot_experts(x: torch.Tensor, top: int = 3, factor: float = 1.0) -> list[tuple[int, float]]:
    """The ``top`` most loaded indices of a 1-D load whose load exceeds ``factor`` x mean, as
    ``(index, load / mean)``, hottest first. Empty for an all-zero load."""
    x = _f(x)
    mean = float(x.mean())
    if mean <= 0:
        return []
    values, index = torch.sort(x, descending=True, stable=True)
    return [(int(i), float(v) / mean) for v, i in zip(values[:top], index[:top]) if float(v) > factor * mean]


def _check_num_gpus(num_gpus: int | None) -> None:
    # A zero or negative count would divide by zero or reach reshape as a bad dimension.
    if num_gpus is not None and num_gpus < 1:
        raise ValueError(f"num_gpus: {num_gpus}; expected a GPU count >= 1")


def gpu_loads(
    expert_load: torch.Tensor,
    *,
    num_gpus: int | None = None,
    physical_to_logical_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """Load per GPU ``[..., L, G]`` from logical expert loads ``[..., L, E]`` and a placement.

    Parameters
    ----------
    expert_load:
        Tokens per logical expert, ``[..., L, E]``.
    num_gpus:
        GPUs of the expert-parallel group. Without a map, experts sit contiguously:
        GPU ``g`` holds experts ``[g*E/G, (g+1)*E/G)`` (``E % G == 0``).
    physical_to_logical_map:
        int ``[L, P]``: the logical expert of each physical slot; slots sit contiguously on GPUs
        (``P/G`` each, SGLang's layout). A replicated expert's load is split evenly over its
        replicas, the model SGLang's static dispatch and TensorRT-LLM's projection use.

    Raises ``ValueError`` where load would be lost: an expert with load but no slot in the map.

    >>> gpu_loads(torch.tensor([[4, 0, 2, 2]]), num_gpus=2).tolist()
    [[4.0, 4.0]]
    """
    _check_num_gpus(num_gpus)
    load = _f(expert_load)
    E = load.shape[-1]
    if physical_to_logical_map is None:
        if num_gpus is None or E % num_gpus:
            raise ValueError(f"num_gpus: {num_gpus} must divide the {E} experts for a contiguous placement")
        return load.reshape(*load.shape[:-1], num_gpus, E // num_gpus).sum(-1)
    m = torch.as_tensor(physical_to_logical_map)
    if m.dtype.is_floating_point or m.dtype.is_complex or m.dtype == torch.bool or m.dim() != 2:
        raise ValueError(
            f"physical_to_logical_map: expected an int tensor [layers, physical slots], got {m.dtype} {list(m.shape)}"
        )
    m = m.to(torch.int64)
    L, P = m.shape
    if load.dim() < 2 or load.shape[-2] != L:
        raise ValueError(f"physical_to_logical_map: {L} layers, but the load has shape {list(load.shape)}")
    if m.numel() and (int(m.min()) < 0 or int(m.max()) >= E):
        raise ValueError(f"physical_to_logical_map: entries must be in [0, {E})")
    G = num_gpus or 1
    if P % G:
        raise ValueError(f"num_gpus: {G} does not divide the {P} physical slots")
    replicas = torch.zeros(L, E, dtype=torch.float64).scatter_add_(1, m, torch.ones(L, P, dtype=torch.float64))
    # An expert without a slot would silently drop its load from every GPU: refuse instead.
    lost = load.reshape(-1, L, E).sum(0) * (replicas == 0)
    if bool((lost > 0).any()):
        layer, expert = (int(i) for i in (lost > 0).nonzero()[0])
        more = int((lost > 0).sum()) - 1
        raise ValueError(
            f"physical_to_logical_map: layer {layer} has no slot for expert {expert}, which got"
            f" {float(lost[layer, expert]):g} token(s): their load would be lost"
            + (f" ({more} more such (layer, expert) pairs)" if more else "")
        )
    per_replica = _ratio(load, replicas.expand_as(load)).nan_to_num(0.0)  # unplaced experts have no load (checked)
    slots = per_replica.gather(-1, m.expand(*load.shape[:-2], L, P))
    return slots.reshape(*slots.shape[:-1], G, P // G).sum(-1)


def physical_gpu_loads(physical_load: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Load per GPU ``[..., L, G]`` from recorded physical-slot loads ``[..., L, P]`` (exact, no model)."""
    _check_num_gpus(num_gpus)
    x = _f(physical_load)
    P = x.shape[-1]
    if P % num_gpus:
        raise ValueError(f"num_gpus: {num_gpus} does not divide the {P} physical slots")
    return x.reshape(*x.shape[:-1], num_gpus, P // num_gpus).sum(-1)
