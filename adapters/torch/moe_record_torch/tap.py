"""``attach`` / ``layer_map``: forward hooks that feed a Recorder, and their exact undo.

What counts
-----------
* One forward pass is one call of the module passed to ``attach`` (its forward hook calls
  ``recorder.step()``), so ``model.generate()`` gives one pass per generation step.
* A call that raises (out of memory, a bad input found in layer 3, Ctrl-C) ends its pass too:
  the layers it recorded are a pass of their own, never merged into the next call's, and
  nothing recorded is lost (SGLang ends its pass in a ``finally`` as well). The exception
  reaches the caller unchanged. An ``Exception`` ends the pass as it leaves the model; a
  ``BaseException`` such as ``KeyboardInterrupt`` (PyTorch runs no hook for it) at the next
  call, or at ``detach``.
* Every token row a router sees counts once per MoE layer, except padding: when the top module
  is called with an ``attention_mask`` keyword (as ``generate()`` and tokenizers' batches do), 2-D
  or 4-D (``generate()`` with a static cache; per attention type, its full-attention mask), rows
  whose mask is 0 are left out. The tap moves them behind the real rows (a stable sort on
  the device) and passes their number as ``num_valid_tokens``, so no host sync is needed and
  ``per_token`` ids keep the real tokens in order. Without a mask every row counts.
* Layers are decoder indices; dense layers are in the numbering but not recorded.
* Gradient checkpointing recomputes routers (or the whole model) during backward: those calls
  are not counted again, nor are they passes.

The hooks only read; they never change an output, and ``detach`` removes exactly the hooks
``attach`` added. Under ``torch.compile`` the hooks are traced into the graph (tensor ops only,
``fullgraph=True`` works); dynamo re-traces after ``detach``, so a compiled model stops tapping.
``torch.compile(model)`` runs the top module's own hooks outside the graph, so a compiled call
that raises ends its pass as in eager. (When a compiled function calls the model, those hooks
are in its graph too, and a graph that raises part-way ends no pass.)
In a captured CUDA graph the tap replays with the graph; ``recorder.stop()`` gates it on the device.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from moe_record_sdk import EngineInfo, Recorder
from moe_record_sdk.errors import AdapterError
from moe_record_sdk.plugins import Attachment, LayerMap
from moe_record_sdk.recorder import RECORDER_OPTIONS

from .routers import Extract, Found, RouterSpec, find_routers

ADAPTER = "torch"
DISTRIBUTION = "moe-record-torch"

# Modules that carry a live tap (the top module and every router), so a second attach, also on
# a submodule or a parent, is refused. Weak: a model that goes away takes its entry with it.
_TAPPED: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


class _Padding:
    """The top call's 2-D attention mask, turned per row count into (row order, valid rows)."""

    def __init__(self, model: nn.Module) -> None:
        self.mask: torch.Tensor | None = None
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # Where forward takes attention_mask by position (``model(ids, mask)``), if it does.
        try:
            params = list(inspect.signature(model.forward).parameters.values())
        except (TypeError, ValueError):  # a forward whose signature cannot be read: keywords only
            params = []
        self.position = next(
            (i for i, p in enumerate(params) if p.name == "attention_mask" and p.kind == p.POSITIONAL_OR_KEYWORD), None
        )

    def begin(self, args: tuple, kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and self.position is not None and len(args) > self.position:
            mask = args[self.position]
        if isinstance(mask, dict):  # one mask per attention type (GptOss: full and sliding)
            mask = mask.get("full_attention")
        if isinstance(mask, torch.Tensor) and mask.dim() == 4:
            mask = _new_tokens_of(mask)
        self.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self.cache = {}

    def end(self) -> None:
        self.mask, self.cache = None, {}

    def rows(self, num_rows: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For a router input of ``num_rows`` = batch x new tokens: valid rows first, and their number."""
        mask = self.mask
        if mask is None:
            return None
        batch, seen = mask.shape
        if num_rows % batch or num_rows // batch > seen:
            return None  # not [batch, new tokens] rows: count them all
        if num_rows not in self.cache:
            # The new tokens are the mask's last columns (with a KV cache the mask covers the past too).
            valid = mask[:, seen - num_rows // batch :].reshape(-1) != 0
            order = torch.argsort((~valid).to(torch.int8), stable=True)
            self.cache[num_rows] = (order, valid.sum())
        return self.cache[num_rows]


def _new_tokens_of(mask: torch.Tensor) -> torch.Tensor:
    """A 4-D attention mask [batch, heads, new tokens, key slots] (what ``generate()`` passes with
    a static cache) as the 2-D mask of its new tokens: a real token attends to its own key slot,
    padding does not. The slots of a call's tokens are consecutive, and a real token's own slot is
    the last one it attends to (causal), so the first slot is the largest ``last - row`` of any row.
    """
    attends = mask[:, 0] != 0 if not mask.dtype.is_floating_point else mask[:, 0] == 0  # additive: 0 attends
    rows, slots = attends.shape[-2:]
    last = torch.where(attends, torch.arange(slots, device=mask.device), -1).amax(-1)  # [batch, rows]
    first = (last - torch.arange(rows, device=mask.device)).amax()
    own = (first + torch.arange(rows, device=mask.device)).clamp(0, slots - 1)
    return attends.gather(-1, own.expand(attends.shape[0], rows).unsqueeze(-1)).squeeze(-1)


def _in_backward() -> bool:
    """Whether autograd is running a backward: a router called then is gradient checkpointing
    recomputing a forward the tap already counted."""
    return not torch.compiler.is_compiling() and _graph_task_id() != -1


_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)


def _tap(recorder: Recorder, layer_id: int, extract: Extract, padding: _Padding | None):
    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        if _in_backward():
            return
        try:
            ids = extract(module, args, output)
        except (IndexError, KeyError, TypeError, AttributeError) as e:
            raise AdapterError(
                f"layer {layer_id}: extract could not take the top-k ids from {type(module).__name__}'s output "
                f"({type(e).__name__}: {e}); check attach(extract=...)"
            ) from e
        ids = ids.reshape(-1, ids.shape[-1])
        valid = None
        if padding is not None and (rows := padding.rows(ids.shape[0])) is not None:
            order, valid = rows
            ids = ids.index_select(0, order)
        if ids.device != recorder.device:  # models spread over devices (device_map)
            ids = ids.to(recorder.device, non_blocking=True)
            valid = None if valid is None else valid.to(recorder.device, non_blocking=True)
        recorder.record(layer_id, ids, valid)

    return hook


def _engine(model: nn.Module) -> EngineInfo:
    if type(model).__module__.startswith("transformers."):
        import transformers

        return EngineInfo(name="transformers", version=transformers.__version__, adapter=DISTRIBUTION)
    return EngineInfo(name="torch", version=str(torch.__version__), adapter=DISTRIBUTION)


def _model_name(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or getattr(config, "name", None) or type(model).__name__


def _layer_map(model: nn.Module, found: Found, layers: Sequence[int] | None) -> LayerMap:
    ids = known = [r.layer_id for r in found.routers]
    if layers is not None:
        unknown = sorted(set(layers) - set(known))
        if unknown:
            raise AdapterError(f"layers: {unknown} are not MoE layers of {type(model).__name__} (those are {known})")
        ids = sorted(set(layers))
        if not ids:
            raise AdapterError(f"layers: [] selects none of {type(model).__name__}'s MoE layers ({known})")
    return LayerMap(
        num_layers=found.num_layers,
        moe_layer_ids=tuple(ids),
        num_experts=found.num_experts,
        top_k=found.top_k,
        model_name=_model_name(model),
    )


def layer_map(
    model: nn.Module,
    *,
    routers: RouterSpec | None = None,
    extract: Extract | None = None,
    num_experts: int | None = None,
    top_k: int | None = None,
    num_layers: int | None = None,
    layers: Sequence[int] | None = None,
) -> LayerMap:
    """What ``attach`` would record on ``model``, without touching it.

    Takes the same keywords as ``attach`` (``routers``, ``extract``, shape overrides, ``layers``).

    Example
    -------
    >>> from moe_record_torch.tiny import TinyMoE, TinyMoEConfig
    >>> layer_map(TinyMoE(TinyMoEConfig(num_layers=3, first_dense_layers=1))).moe_layer_ids
    (1, 2)
    """
    found = find_routers(model, routers, extract=extract, num_experts=num_experts, top_k=top_k, num_layers=num_layers)
    return _layer_map(model, found, layers)


def attach(
    model: nn.Module,
    recorder: Recorder | None = None,
    *,
    mode: str = "stat",
    routers: RouterSpec | None = None,
    extract: Extract | None = None,
    num_experts: int | None = None,
    top_k: int | None = None,
    num_layers: int | None = None,
    layers: Sequence[int] | None = None,
    mask_padding: bool = True,
    **recorder_kwargs: Any,
) -> Attachment:
    """Tap every MoE router of ``model`` into a Recorder; return the handle (``.recorder``, ``.detach()``).

    The recorder is not started: call ``att.recorder.start()`` (SGLang semantics: nothing is
    recorded until start).

    Parameters
    ----------
    model:
        The top module: each call of it is one forward pass (``recorder.step()`` after it).
    recorder:
        The recorder to feed; None builds one sized by the layer map, on the routers' device,
        with ``mode`` and ``recorder_kwargs`` (``buffer_size``, ``max_bytes``, ``topology``, ...).
    routers, extract:
        The explicit form for models this adapter does not know: a name pattern
        (``"blocks.*.moe.router"``), a list of modules or ``{layer_id: module}``, and
        ``extract(module, args, output) -> topk_ids`` (see ``ids_at``, ``topk_of_logits``).
        Default: transformers 5.x MoE routers (Qwen3Moe, Qwen2Moe, Mixtral, OLMoE, DeepseekV3,
        GptOss; other ``*TopKRouter`` best-effort) and ``TinyMoE``'s.
    num_experts, top_k, num_layers:
        Shape overrides when the routers do not say.
    layers:
        Record only these MoE layers (a pipeline stage's, say); default all.
    mask_padding:
        Leave out rows whose ``attention_mask`` is 0 (see the module docstring).

    Example
    -------
    >>> from moe_record_torch.tiny import TinyMoE
    >>> model = TinyMoE()
    >>> att = attach(model)
    >>> att.recorder.start()
    >>> _ = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4)
    >>> dump = att.recorder.dump()
    >>> dump.window.num_passes, int(dump.total_count()[0].sum())  # 3 prompt + 3 new tokens, top_k=2
    (4, 12)
    >>> att.detach()
    """
    found = find_routers(model, routers, extract=extract, num_experts=num_experts, top_k=top_k, num_layers=num_layers)
    lm = _layer_map(model, found, layers)
    taps = [r for r in found.routers if r.layer_id in lm.moe_layer_ids]
    busy = [name or "<top module>" for name, m in model.named_modules() if m in _TAPPED]
    if busy:
        raise AdapterError(
            f"{type(model).__name__}: already attached at {', '.join(busy)}; detach that attachment first"
        )
    if recorder is None:
        unknown = sorted(set(recorder_kwargs) - RECORDER_OPTIONS)
        if unknown:
            raise AdapterError(
                f"attach: unknown options {unknown}; Recorder options are {sorted(RECORDER_OPTIONS - {'mode'})}"
            )
        kwargs = lm.recorder_kwargs()
        kwargs.setdefault("engine", _engine(model))
        kwargs.update(recorder_kwargs)
        if "device" not in kwargs:  # where the first router computes (its weights, else the model's)
            first = next((p for m in (taps[0].module, model) for p in m.parameters()), None) if taps else None
            kwargs["device"] = first.device if first is not None else torch.device("cpu")
        recorder = Recorder(mode=mode, **kwargs)
    else:
        if recorder_kwargs:
            raise AdapterError(
                f"recorder_kwargs {sorted(recorder_kwargs)} given with a recorder: pass one or the other"
            )
        _check_fits(recorder, lm)

    padding = _Padding(model) if mask_padding else None
    handles = []
    left_open = False  # a call began and did not end: a BaseException left it (no hook runs then)

    def begin(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        nonlocal left_open
        if _in_backward():  # checkpointing recomputes the whole model (and stops it early by raising): no pass
            return
        if left_open:  # the interrupted call's layers are a pass of their own, not part of this one
            recorder.step()
        left_open = True
        if padding is not None:
            padding.begin(args, kwargs)

    def end(module: nn.Module, args: tuple, output: Any) -> None:
        nonlocal left_open
        if _in_backward():
            return
        recorder.step()
        left_open = False
        if padding is not None:
            padding.end()

    try:
        for r in taps:
            handles.append(r.module.register_forward_hook(_tap(recorder, r.layer_id, r.extract, padding)))
        handles.append(model.register_forward_pre_hook(begin, with_kwargs=True))
        # always_call: a forward that raises an Exception ends its pass too, then the exception goes on.
        handles.append(model.register_forward_hook(end, always_call=True))
    except BaseException:
        for h in handles:
            h.remove()
        raise
    marked = [model] + [r.module for r in taps]
    for m in marked:
        _TAPPED[m] = ADAPTER

    def undo() -> None:
        nonlocal left_open
        for h in handles:
            h.remove()
        if left_open:  # an interrupted call's layers: ended here, or the recorder's next user would merge them
            recorder.step()
            left_open = False
        for m in marked:
            _TAPPED.pop(m, None)

    return Attachment(adapter=ADAPTER, layer_map=lm, undo=undo, recorder=recorder)


def _check_fits(recorder: Recorder, lm: LayerMap) -> None:
    """Refuse a recorder that cannot count this model's layers and experts."""
    problems = lm.fit_problems(recorder)
    if problems:
        raise AdapterError("recorder does not fit the model: " + "; ".join(problems))
