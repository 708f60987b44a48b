"""Finding a model's routers: the transformers 5.x MoE families on their own, any module explicitly.

A *router* is the submodule whose forward computes the top-k expert ids of one MoE layer. In
transformers 5.x (read in 5.19: ``models/*/modeling_*.py``) most MoE families route in a
``*TopKRouter`` submodule (``mlp.gate``; ``mlp.router`` for GptOss) that returns
``(router_logits, routing_weights, topk_ids)``, so a forward hook there sees the ids exactly as
the experts receive them; HunYuan-MoE, Gemma-4 and AFMoE do the same under other class names.
Llama-4's router returns its logits, and Jamba's block routes through a plain ``nn.Linear``:
their extractors repeat the model's own top-k of those logits. The layer id is the router's
index in the decoder-layer ``nn.ModuleList`` (``model.layers``), so dense layers (DeepseekV3's ``first_k_dense_replace``,
Qwen's ``mlp_only_layers``) keep their place in the numbering, as SGLang numbers them.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moe_record_sdk.errors import AdapterError

from .version import TRANSFORMERS_SUPPORTED

#: ``extract(module, args, output) -> topk_ids``: called like a forward hook on the router;
#: returns integer ids ``[tokens, top_k]`` (or ``[..., top_k]``, flattened to rows).
Extract = Callable[[nn.Module, tuple, Any], torch.Tensor]

#: What ``routers=`` accepts: a name pattern (``fnmatch`` over ``named_modules()``), modules, or
#: ``{layer_id: module}``.
RouterSpec = str | Iterable[nn.Module] | Mapping[int, nn.Module]


def ids_at(index: int) -> Extract:
    """Extractor for routers that return a tuple holding the ids at ``index``.

    Example: ``attach(model, routers="*.mlp.gate", extract=ids_at(2), num_experts=8, top_k=2)``.
    """

    def extract(module: nn.Module, args: tuple, output: Any) -> torch.Tensor:
        return output[index]

    return extract


def topk_of_logits(top_k: int | None, index: int | None = None) -> Extract:
    """Extractor for routers that return logits (``output``, or ``output[index]``): the top-k ids.

    Use it for a plain ``nn.Linear`` gate, where the model computes top-k inline afterwards; the
    ids match the model's only when the model takes ``torch.topk`` of the same logits (or of a
    monotone function of them, e.g. softmax) without other terms. ``top_k=None``: the router's
    own ``top_k`` (a router that takes ``torch.topk`` of the logits it returns, as Llama-4's).
    """

    def extract(module: nn.Module, args: tuple, output: Any) -> torch.Tensor:
        logits = output if index is None else output[index]
        return torch.topk(logits, module.top_k if top_k is None else top_k, dim=-1).indices

    return extract


def int_ids_in_output(module: nn.Module, args: tuple, output: Any) -> torch.Tensor:
    """Default extractor: the integer tensor of the output (a tuple's first integer member)."""
    items = output if isinstance(output, (tuple, list)) else (output,)
    for item in items:
        if isinstance(item, torch.Tensor) and not (item.dtype.is_floating_point or item.dtype == torch.bool):
            return item
    raise AdapterError(
        f"{type(module).__name__}: its output holds no integer top-k ids; pass extract= "
        "(e.g. moe_record_torch.topk_of_logits(k)) to say how to get them"
    )


#: transformers 5.x router classes verified by a test, and our tiny model's.
KNOWN_ROUTERS: dict[str, Extract] = {
    **{
        name: ids_at(2)  # (logits, weights, ids)
        for name in (
            "Qwen3MoeTopKRouter",
            "Qwen2MoeTopKRouter",
            "MixtralTopKRouter",
            "OlmoeTopKRouter",
            "DeepseekV3TopkRouter",
            "GptOssTopKRouter",
            "HunYuanMoEV1Gate",
            "Gemma4TextRouter",
            "AfmoeTokenChoiceRouter",
            "TinyMoERouter",
        )
    },
    "Llama4Router": topk_of_logits(None, index=1),  # (scores, logits): its ids are topk(logits), the same call
}
# Other transformers families name their router ``*TopKRouter`` (DeepSeek-V4 also ``*HashRouter``) and return the ids as
# the one integer tensor of the output (some at index 0, most at 2): tapped on a best-effort basis.
_GENERIC_ROUTER = re.compile(r"(Top[Kk]|Hash)Router$")


def _softmax_topk_of(block: nn.Module) -> Extract:
    """Extractor for a plain ``nn.Linear`` router whose block takes ``torch.topk`` of
    ``softmax(logits, dtype=float)`` with the block's ``top_k``: the block's own ops, so its ids."""

    def extract(module: nn.Module, args: tuple, output: Any) -> torch.Tensor:
        return torch.topk(torch.softmax(output, dim=-1, dtype=torch.float), block.top_k, dim=-1).indices

    return extract


#: MoE blocks whose router is a plain ``nn.Linear`` child (the block chooses the ids inline):
#: block class -> (the child to tap, the extractor given the block). The block gives the shape.
KNOWN_BLOCKS: dict[str, tuple[str, Callable[[nn.Module], Extract]]] = {
    "JambaSparseMoeBlock": ("router", _softmax_topk_of),
}


@dataclass(frozen=True)
class Router:
    """One tap site: the router of decoder layer ``layer_id``."""

    layer_id: int
    name: str
    module: nn.Module
    extract: Extract
    owner: nn.Module | None = None  # whose attributes give the shape, where not the router's (its block's)


@dataclass(frozen=True)
class Found:
    """Every router of a model, and the model's shape as the routers tell it."""

    routers: tuple[Router, ...]
    num_layers: int
    num_experts: int
    top_k: int


def _decoder_index(model: nn.Module, name: str) -> tuple[int, int, str] | None:
    """(index in the outermost enclosing ModuleList, its length, the list's name) for a module name:
    the decoder layer list, also where a layer holds a list of its own (T5/Switch:
    ``encoder.block.N.layer.M.mlp.router`` is layer N)."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        if not parts[i].isdigit():
            continue
        parent_name = ".".join(parts[:i])
        parent = model.get_submodule(parent_name)
        if isinstance(parent, nn.ModuleList):
            return int(parts[i]), len(parent), parent_name
    return None


def _attr(module: nn.Module, names: tuple[str, ...]) -> int | None:
    """The first of ``names`` that is an int attribute of ``module``, or of its ``config``
    (Gemma-4's router keeps its shape there only)."""
    for holder in (module, getattr(module, "config", None)):
        for n in names:
            v = getattr(holder, n, None)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
    return None


def _auto_routers(model: nn.Module) -> list[tuple[str, nn.Module, Extract, nn.Module | None]]:
    out = []
    for name, module in model.named_modules():
        cls = type(module).__name__
        if cls in KNOWN_ROUTERS:
            out.append((name, module, KNOWN_ROUTERS[cls], None))
        elif cls in KNOWN_BLOCKS:
            child, make = KNOWN_BLOCKS[cls]
            out.append((f"{name}.{child}" if name else child, module.get_submodule(child), make(module), module))
        elif _GENERIC_ROUTER.search(cls) and _attr(module, ("top_k",)) is not None:
            out.append((name, module, int_ids_in_output, None))
    return out


def _explicit_routers(model: nn.Module, routers: RouterSpec) -> list[tuple[str, nn.Module, int | None]]:
    names = {id(m): n for n, m in model.named_modules()}
    if isinstance(routers, str):
        found = [(n, m, None) for n, m in model.named_modules() if n and fnmatch.fnmatchcase(n, routers)]
        if not found:
            raise AdapterError(f"routers={routers!r}: no submodule of {type(model).__name__} matches")
        return found
    items = list(routers.items()) if isinstance(routers, Mapping) else [(None, m) for m in routers]
    out = []
    for layer_id, m in items:
        if not isinstance(m, nn.Module) or id(m) not in names:
            raise AdapterError(f"routers: {type(m).__name__} is not a submodule of {type(model).__name__}")
        out.append((names[id(m)], m, layer_id))
    if not out:
        raise AdapterError("routers: empty")
    return out


def find_routers(
    model: nn.Module,
    routers: RouterSpec | None = None,
    *,
    extract: Extract | None = None,
    num_experts: int | None = None,
    top_k: int | None = None,
    num_layers: int | None = None,
) -> Found:
    """Find the routers of ``model`` (transformers 5.x families on their own, or those named).

    Parameters
    ----------
    routers:
        None to find transformers routers (and ``TinyMoE``'s); else a name pattern such as
        ``"layers.*.mlp.gate"``, a list of modules, or ``{layer_id: module}``.
    extract:
        How to get the ids from a named router (default: the integer tensor of its output).
    num_experts, top_k, num_layers:
        The model's shape; default: read from the routers (``num_experts`` / ``top_k``
        attributes) and the decoder-layer list that holds them.

    Raises ``AdapterError`` when nothing is found or the routers disagree on the shape.
    """
    if routers is None:
        sites = [(n, m, None, ex, owner) for n, m, ex, owner in _auto_routers(model)]
        if not sites:
            raise AdapterError(
                f"{type(model).__name__}: no MoE router found (transformers {TRANSFORMERS_SUPPORTED} "
                "*TopKRouter modules, TinyMoE); name them with routers= and extract="
            )
    else:
        sites = [(n, m, lid, extract or int_ids_in_output, None) for n, m, lid in _explicit_routers(model, routers)]

    taps: list[Router] = []
    lists: set[str] = set()
    depth = 0
    for order, (name, module, layer_id, ex, owner) in enumerate(sites):
        where = _decoder_index(model, name)
        if where is not None:
            lists.add(where[2])
            depth = max(depth, where[1])
        if layer_id is None:
            layer_id = where[0] if where is not None else order
        taps.append(Router(layer_id=layer_id, name=name, module=module, extract=ex, owner=owner))
    if routers is None and len(lists) > 1:
        raise AdapterError(
            f"{type(model).__name__}: routers sit in several layer lists ({', '.join(sorted(lists))}); "
            "name the ones to record with routers="
        )
    ids = [t.layer_id for t in taps]
    if len(set(ids)) != len(ids):
        shared = [f"{t.name} -> {t.layer_id}" for t in taps if ids.count(t.layer_id) > 1]
        raise AdapterError(
            f"routers: several routers map to one layer id ({', '.join(shared[:6])}"
            f"{', ...' if len(shared) > 6 else ''}); a pattern's * also matches dots (fnmatch): narrow it, "
            "or pass {layer_id: module}"
        )

    def shape(value: int | None, attrs: tuple[str, ...], what: str) -> int:
        if value is not None:
            return value
        seen = {_attr(t.owner or t.module, attrs) for t in taps}
        if None in seen or len(seen) != 1:
            raise AdapterError(
                f"{what}: cannot read it from the routers ({type(taps[0].owner or taps[0].module).__name__}.{attrs[0]} "
                f"gives {sorted(seen, key=str)}); pass {what}="
            )
        return seen.pop()  # type: ignore[return-value]

    E = shape(num_experts, ("num_experts", "num_local_experts", "n_routed_experts"), "num_experts")
    k = shape(top_k, ("top_k", "num_experts_per_tok", "top_k_experts"), "top_k")
    L = num_layers if num_layers is not None else max(depth, max(ids) + 1)
    if max(ids) >= L or min(ids) < 0:
        raise AdapterError(f"num_layers={L}: router layer ids {sorted(ids)} must lie in [0, {L})")
    return Found(routers=tuple(sorted(taps, key=lambda t: t.layer_id)), num_layers=L, num_experts=E, top_k=k)
