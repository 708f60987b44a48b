"""Expert-parallel load balancing plans from recorded load: replicate hot experts, pack GPUs.

Inputs and outputs follow the DeepSeek EPLB algorithm's interface (what SGLang's and vLLM's
EPLB consume): a weight ``[L, E]`` (tokens per logical expert per layer) and ``R`` physical
slots on ``G`` GPUs in, ``phy2log [L, R]``, ``log2phy [L, E, X]`` (-1 padded) and
``logcnt [L, E]`` out. The algorithm is ours:

1. *Groups to nodes* (hierarchical, when ``num_groups % num_nodes == 0`` and there are several
   nodes): expert groups (group-limited routing) are packed onto nodes, the same number each,
   so that the nodes carry equal load and a token's groups stay on few nodes.
2. *Replication*: each node's ``R / N`` slots go one per expert, then one at a time to the
   expert whose per-replica load ``w / replicas`` is highest (this minimises the largest
   per-replica load). Counts proportional to load and even counts are tried as well.
3. *Packing*: replicas, heaviest first, go to the least loaded GPU with a free slot
   (``R / G`` slots each); then pairwise swaps lower the heaviest GPU while they can. Of the
   replica counts tried, the one that packs with the lightest busiest GPU wins.
4. *Never worse than doing nothing*: a layer whose plan would load its busiest GPU more than
   the trivial placement (slot ``p`` holds expert ``p % E``, SGLang's ``init_trivial``) gets a
   global plan instead of a hierarchical one, or else keeps the trivial placement.

Load model: a replicated expert's tokens split evenly over its replicas.

>>> import torch
>>> weight = torch.tensor([[90, 10, 10, 10]])
>>> plan = rebalance(weight, num_replicas=6, num_gpus=2)
>>> plan.phy2log.tolist(), plan.gpu_loads(weight).tolist()
([[0, 1, 2, 0, 1, 3]], [[60.0, 60.0]])
"""

from __future__ import annotations

import heapq
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from ..schema.io import save_torch
from ..schema.sglang import check_init_expert_location_name
from . import metrics as m


@dataclass(frozen=True)
class EplbPlan:
    """A placement of ``R`` physical expert slots on ``G`` GPUs (``R / G`` contiguous slots each)."""

    phy2log: torch.Tensor
    """int64 [L, R]: the logical expert in each physical slot (SGLang's ``physical_to_logical_map``)."""
    log2phy: torch.Tensor
    """int64 [L, E, X]: each logical expert's physical slots, ascending, -1 padded."""
    logcnt: torch.Tensor
    """int64 [L, E]: replicas per logical expert (>= 1)."""
    num_gpus: int
    num_nodes: int = 1
    num_groups: int = 1
    hierarchical: bool = False
    global_layers: list[int] = field(default_factory=list)
    """Hierarchical plans: layers planned globally, because keeping groups on nodes would have
    loaded the busiest GPU more than the trivial placement."""
    trivial_layers: list[int] = field(default_factory=list)
    """Layers that kept the trivial placement: no plan beat it, or no load was recorded there
    (dense layers, layers the recorder did not observe, idle ones), so any plan would be a guess."""

    @property
    def num_replicas(self) -> int:
        return self.phy2log.shape[1]

    def gpu_loads(self, weight: torch.Tensor) -> torch.Tensor:
        """Predicted tokens per GPU ``[L, G]`` for a weight ``[L, E]`` under this plan."""
        return m.gpu_loads(weight, num_gpus=self.num_gpus, physical_to_logical_map=self.phy2log)

    def save_sglang(self, path: str | os.PathLike[str]) -> str:
        """Write SGLang's ``--init-expert-location`` file: ``{"physical_to_logical_map": [L, R]}``.

        SGLang 0.5.23 (``srt/eplb/expert_location.py``, ``compute_initial_expert_location_metadata``)
        loads it with ``torch.load(weights_only=True)`` and calls
        ``init_by_mapping(model_config, **data, moe_ep_rank=...)``: the file must hold that one
        key. L must be the model's ``num_hidden_layers`` and R the engine's physical experts
        (``num_logical_experts + --ep-num-redundant-experts``).
        """
        check_init_expert_location_name(path)
        return save_torch({"physical_to_logical_map": self.phy2log.clone()}, path)


def trivial_placement(num_layers: int, num_experts: int, num_replicas: int) -> torch.Tensor:
    """SGLang's default placement: slot ``p`` holds logical expert ``p % E``, int64 [L, R]."""
    return (torch.arange(num_replicas, dtype=torch.int64) % num_experts).expand(num_layers, num_replicas).clone()


def replicate(weight: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Replicas per expert, int64 [L, n]: one each, then each extra slot to the expert with the
    highest load per replica (ties: the lowest index); where no load is left, evenly (the fewest
    replicas first, then the lowest index)."""
    w = weight.to(torch.float64)
    L, n = w.shape
    if num_slots < n:
        raise ValueError(f"num_replicas: {num_slots} slots cannot hold {n} experts")
    return torch.tensor([_replicate_row(row, num_slots) for row in w.tolist()], dtype=torch.int64).reshape(L, n)


def _replicate_row(w: list[float], num_slots: int) -> list[int]:
    # A heap instead of an argmax over all n experts for each of the R slots: the same picks, as
    # only the expert that got a slot changes its load per replica.
    cnt = [1] * len(w)
    heap = [(-x, i) for i, x in enumerate(w)]  # (-load per replica, index): the first is the argmax
    heapq.heapify(heap)
    left = num_slots - len(w)
    while left and heap and -heap[0][0] > 0:
        _, i = heapq.heappop(heap)
        cnt[i] += 1
        heapq.heappush(heap, (-(w[i] / cnt[i]), i))
        left -= 1
    # No expert has load left to spread: the rest go evenly.
    even = [(c, i) for i, c in enumerate(cnt)]
    heapq.heapify(even)
    for _ in range(left):
        c, i = even[0]
        cnt[i] = c + 1
        heapq.heapreplace(even, (c + 1, i))
    return cnt


_DENSE_CAPACITY = 64
"""Up to this many items per bin, every swap is tried at once (fewer array calls); above, each
bin's items are sorted and searched (far fewer elements)."""


def _best_swap_dense(held: np.ndarray, total: np.ndarray, h: int) -> tuple[int, int, int] | None:
    """The swap ``pack`` makes: ``(bin j, place of the item in bin h, place of the item in j)``,
    the one that lowers ``max(total[h], total[j])`` most, below ``total[h] - 1e-9`` (ties: the
    first in that order), or None. ``held [bins, capacity]``: the items' loads; ``h`` the heaviest.

    Every ``(j, a, c)`` at once; the arithmetic is the scalar one's, element by element, so ties
    fall as in a loop over them. A swap with ``a <= c`` leaves the peak at ``total[h]`` or above,
    never the lowest below the limit: no need to mask it.
    """
    top = total[h]
    d = held[h][None, :, None] - held[:, None, :]  # [bin j, item a of h, item c of j]
    peak = np.maximum(top - d, total[:, None, None] + d)
    peak[h] = np.inf
    i = int(peak.argmin())  # the first of the lowest
    if not peak.flat[i] < top - 1e-9:
        return None
    cap = held.shape[1]
    j, place = divmod(i, cap * cap)
    return j, *divmod(place, cap)


def _best_swap_sorted(held: np.ndarray, total: np.ndarray, h: int) -> tuple[int, int, int] | None:
    """``_best_swap_dense``'s answer from ``log(capacity)`` passes over ``[bins, capacity]``.

    For an item ``a`` of ``h`` and bin ``j``'s items ``c`` by ascending load, ``d = a - c`` falls,
    so ``top - d`` rises and ``total[j] + d`` falls (rounding keeps the order): the peak, their
    maximum, falls then rises, and its lowest is at either side of the first ``c`` where
    ``top - d >= total[j] + d``. A bisection finds that place for every ``(j, a)``; the item of
    the chosen ``j`` is then found in place order, as in the dense search.
    """
    bins, cap = held.shape
    top = total[h]
    light = np.sort(held, axis=1)
    rows = np.arange(bins)[:, None]
    a = held[h][None, :]  # [1, capacity] against [bins, capacity]
    other = total[:, None]

    def peak_at(k: np.ndarray) -> np.ndarray:
        d = a - light[rows, np.clip(k, 0, cap - 1)]
        return np.maximum(top - d, other + d)

    lo = np.zeros((bins, cap), dtype=np.int64)
    hi = np.full((bins, cap), cap, dtype=np.int64)
    for _ in range(cap.bit_length()):
        mid = (lo + hi) // 2
        d = a - light[rows, np.minimum(mid, cap - 1)]
        rose = top - d >= other + d
        busy = lo < hi
        hi = np.where(busy & rose, mid, hi)
        lo = np.where(busy & ~rose, mid + 1, lo)
    lowest = np.minimum(peak_at(lo - 1), peak_at(lo))  # clipped at the ends: still real swaps
    lowest[h] = np.inf
    i = int(lowest.argmin())  # the first (j, a) of the lowest
    if not lowest.flat[i] < top - 1e-9:
        return None
    j, pa = divmod(i, cap)
    d = held[h, pa] - held[j]
    return j, pa, int(np.maximum(top - d, total[j] + d).argmin())


def pack(loads: list[float], num_bins: int) -> list[int]:
    """Assign items to ``num_bins`` bins of equal item count, balancing the bins' load sums.

    Greedy (heaviest item to the lightest bin with room, ties: the lowest bin), then swaps
    between the heaviest bin and another while a swap lowers the heavier of the two: each time
    the swap that lowers it most (ties: the first in order of bin, then of place in the bins).
    ``len(loads)`` must divide by ``num_bins``.
    """
    n = len(loads)
    if n % num_bins:
        raise ValueError(f"{n} items do not split evenly over {num_bins} bins")
    capacity = n // num_bins
    order = sorted(range(n), key=loads.__getitem__, reverse=True)  # heaviest first, ties: the lowest index
    bin_of = [0] * n
    sums = [0.0] * num_bins
    members: list[list[int]] = [[] for _ in range(num_bins)]
    room = [(0.0, b) for b in range(num_bins)]  # (load, bin) of the bins with room: a heap
    for i in order:
        _, b = heapq.heappop(room)
        bin_of[i] = b
        sums[b] += loads[i]
        members[b].append(i)
        if len(members[b]) < capacity:
            heapq.heappush(room, (sums[b], b))
    if num_bins < 2 or capacity == 0:
        return bin_of
    load = np.asarray(loads, dtype=np.float64)
    member = np.asarray(members, dtype=np.int64)  # [bins, capacity], each bin in order of arrival
    held = load[member]
    total = np.asarray(sums, dtype=np.float64)
    best_swap = _best_swap_dense if capacity <= _DENSE_CAPACITY else _best_swap_sorted
    for _ in range(4 * n):  # bounded: each accepted swap strictly lowers the heaviest bin's load
        h = int(np.argmax(total))  # the heaviest, ties: the lowest bin
        swap = best_swap(held, total, h)
        if swap is None:
            break
        j, pa, pc = swap
        a, c = int(member[h, pa]), int(member[j, pc])
        delta = loads[a] - loads[c]
        total[h] -= delta
        total[j] += delta
        member[h, pa], member[j, pc] = c, a
        held[h, pa], held[j, pc] = load[c], load[a]
        bin_of[a], bin_of[c] = j, h
    return bin_of


def _check(E: int, R: int, G: int, N: int, K: int) -> None:
    if G < 1 or R % G:
        raise ValueError(f"num_replicas: {R} must be a multiple of num_gpus={G}")
    if R < E:
        raise ValueError(f"num_replicas: {R} is fewer than the {E} logical experts")
    if N < 1 or G % N:
        raise ValueError(f"num_nodes: {N} must divide num_gpus={G}")
    if K < 1 or E % K:
        raise ValueError(f"num_groups: {K} must divide the {E} logical experts")


def _candidate_counts(w: list[float], slots: int) -> list[list[int]]:
    """Replica counts worth packing: greedy by load per replica, proportional to load, and even.

    The greedy counts minimise the largest replica, but with a fixed number of slots per GPU a
    few equal replicas can pack worse than fewer, uneven ones; packing each and keeping the best
    costs little.
    """
    n = len(w)
    greedy = replicate(torch.tensor([w], dtype=torch.float64), slots)[0].tolist()
    total = sum(w)
    if total > 0:  # largest remainder on the slots left after one each
        share = [x / total * (slots - n) for x in w]
        prop = [1 + int(s) for s in share]
        for i in sorted(range(n), key=lambda i: (int(share[i]) - share[i], i))[: slots - sum(prop)]:
            prop[i] += 1
    else:
        prop = greedy
    even = [slots // n + (1 if i < slots % n else 0) for i in range(n)]  # SGLang's trivial counts
    out: list[list[int]] = []
    for c in (greedy, prop, even):
        if c not in out:
            out.append(c)
    return out


def _pack_node(w: list[float], experts: list[int], slots: int, gpus: int) -> list[int]:
    """phy2log of one node's ``slots`` slots over its ``gpus`` GPUs: the best packed candidate."""
    best: tuple[float, float, list[int]] | None = None
    local = [w[e] for e in experts]
    for cnt in _candidate_counts(local, slots):
        replicas = [(experts[i], local[i] / cnt[i]) for i in range(len(experts)) for _ in range(cnt[i])]
        gpu_of = pack([load for _, load in replicas], gpus)
        sums = [0.0] * gpus
        for (_, load), b in zip(replicas, gpu_of):
            sums[b] += load
        key = (max(sums), sum(x * x for x in sums))
        if best is None or key < best[:2]:
            # GPU by GPU, each GPU's experts ascending
            best = (*key, [e for _, e in sorted((b, e) for (e, _), b in zip(replicas, gpu_of))])
    assert best is not None
    return best[2]


def _plan_layer(w: list[float], R: int, G: int, N: int, K: int, hierarchical: bool) -> list[int]:
    """phy2log of one layer."""
    E = len(w)
    if hierarchical:
        per_group = E // K
        group_load = [sum(w[g * per_group : (g + 1) * per_group]) for g in range(K)]
        node_of_group = pack(group_load, N)
        node_experts = [
            [e for g in range(K) if node_of_group[g] == n for e in range(g * per_group, (g + 1) * per_group)]
            for n in range(N)
        ]
    else:
        N, node_experts = 1, [list(range(E))]
    phy2log: list[int] = []
    for experts in node_experts:
        phy2log.extend(_pack_node(w, experts, R // N, G // N))
    return phy2log


def logical_to_physical(phy2log: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log2phy [L, E, X], logcnt [L, E])`` from ``phy2log [L, R]``; X = most replicas of any expert."""
    L, R = phy2log.shape
    logcnt = torch.zeros(L, num_experts, dtype=torch.int64).scatter_add_(
        1, phy2log, torch.ones(L, R, dtype=torch.int64)
    )
    X = int(logcnt.max()) if logcnt.numel() else 0
    log2phy = torch.full((L, num_experts, X), -1, dtype=torch.int64)
    # A stable sort by expert lists each expert's slots ascending; a slot's place among them is
    # its place in the sorted row less the slots of the experts before it.
    expert, slot = torch.sort(phy2log, dim=1, stable=True)
    first = logcnt.cumsum(1) - logcnt
    place = torch.arange(R).expand(L, R) - first.gather(1, expert)
    log2phy[torch.arange(L).unsqueeze(1).expand(L, R), expert, place] = slot
    return log2phy, logcnt


def rebalance(
    weight: torch.Tensor,
    num_replicas: int,
    num_gpus: int,
    num_nodes: int = 1,
    num_groups: int = 1,
) -> EplbPlan:
    """Plan ``num_replicas`` physical expert slots over ``num_gpus`` GPUs from a load ``[L, E]``.

    Parameters
    ----------
    weight:
        Tokens per logical expert per layer, ``[L, E]`` (any numeric dtype), e.g.
        ``dump.total_count()``.
    num_replicas:
        Physical slots ``R`` (``E`` + redundant experts), a multiple of ``num_gpus``.
    num_gpus:
        GPUs of the expert-parallel group ``G``; each holds ``R / G`` slots, contiguously.
    num_nodes, num_groups:
        Nodes ``N`` (dividing ``G``) and expert groups ``K`` (dividing ``E``, DeepSeek's ``n_group``).
        When ``N > 1`` and ``K % N == 0`` the plan is hierarchical: groups to nodes first, then
        replicas within each node; otherwise one global plan.

    >>> plan = rebalance(torch.tensor([[8, 1, 1, 2]]), num_replicas=4, num_gpus=2)
    >>> plan.phy2log.tolist()  # no spare slot: the hot expert shares a GPU with the coldest
    [[0, 2, 1, 3]]
    >>> plan.gpu_loads(torch.tensor([[8, 1, 1, 2]])).tolist()
    [[9.0, 3.0]]
    """
    w = torch.as_tensor(weight)
    if w.dim() != 2 or 0 in w.shape:
        raise ValueError(f"weight: expected [layers, experts], both at least 1, got shape {list(w.shape)}")
    if w.dtype.is_complex or w.dtype == torch.bool:
        raise ValueError(f"weight: expected numbers, got dtype {w.dtype}")
    w = w.to(torch.float64)
    if bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
        raise ValueError("weight: loads must be finite and non-negative")
    L, E = w.shape
    R, G, N, K = num_replicas, num_gpus, num_nodes, num_groups
    _check(E, R, G, N, K)
    hierarchical = N > 1 and K % N == 0
    trivial = trivial_placement(L, E, R)

    def plan_all(hier: bool) -> torch.Tensor:
        return torch.tensor(
            [_plan_layer(w[i].tolist(), R, G, N, K, hier) for i in range(L)], dtype=torch.int64
        ).reshape(L, R)

    def peak(mapping: torch.Tensor) -> torch.Tensor:
        return m.gpu_loads(w, num_gpus=G, physical_to_logical_map=mapping).amax(-1)

    limit = peak(trivial) * (1 + 1e-12)
    phy2log = plan_all(hierarchical)
    worse = peak(phy2log) > limit
    global_layers: list[int] = []
    if hierarchical and bool(worse.any()):
        # Group locality cost more balance than doing nothing: a global plan for those layers.
        flat = plan_all(False)
        use = worse & (peak(flat) <= limit)
        phy2log = torch.where(use.unsqueeze(-1), flat, phy2log)
        global_layers = [int(i) for i in torch.nonzero(use).flatten()]
        worse = worse & ~use
    # A layer with no load recorded got an arbitrary plan (every GPU holding one expert twice),
    # which a hot expert there could make worse than the trivial placement.
    worse = worse | (w.sum(1) == 0)
    phy2log = torch.where(worse.unsqueeze(-1), trivial, phy2log)
    log2phy, logcnt = logical_to_physical(phy2log, E)
    return EplbPlan(
        phy2log=phy2log,
        log2phy=log2phy,
        logcnt=logcnt,
        num_gpus=G,
        num_nodes=N,
        num_groups=K,
        hierarchical=hierarchical,
        global_layers=global_layers,
        trivial_layers=[int(i) for i in torch.nonzero(worse).flatten()],
    )


def save_weight(weight: torch.Tensor, path: str | os.PathLike[str]) -> str:
    """Write the ``[L, E]`` weight as a ``.pt`` holding that one tensor (``torch.load(weights_only=True)``)."""
    return save_torch(weight.detach().to("cpu").clone(), path)
