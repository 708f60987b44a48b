"""The reference engine behind ``moe-record serve``: a raw-PyTorch MoE model, a recorder attached
through the torch adapter, a small ``/generate`` endpoint and the control endpoints.

The model is ``moe_record_torch.tiny.TinyMoE`` by default, or any transformers MoE model built
from a ``config.json`` with random weights (nothing is downloaded). Tokens are bytes: a text
prompt is its UTF-8 bytes, so the vocabulary must hold at least 256 ids.

``/generate`` takes SGLang's request shape, JSON:
``{"text": "hi" | ["a", "b"]}`` or ``{"input_ids": [1, 2] | [[1, 2], [3]]}``, plus
``"max_new_tokens": n`` or ``"sampling_params": {"max_new_tokens": n}`` (greedy decoding), and
answers ``{"text", "output_ids", "meta_info": {"prompt_tokens", "completion_tokens"}}`` (a list
of those for a batch). A request over :data:`MAX_REQUEST_TOKENS` is refused (400); a generation
stops early when its client disconnects or the server shuts down (503 then).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from typing import Any

import torch

from ..env import DEFAULT_MAX_BODY
from ..errors import MoeRecordError
from .app import AppRoute, ControlApp, make_app
from .control import ControlError, LocalBackend
from .handler import Response

MAX_NEW_TOKENS = 1024
MAX_PROMPT_TOKENS = 4096
#: The most work one /generate request may ask for, in tokens: the sum over its prompts of prompt
#: length + max_new_tokens. Why: the engine serves one request at a time, so a batch of thousands
#: of prompts would hold every later request (and a shutdown) behind it for hours. This admits
#: any one prompt the limits above allow (4096 + 1024) three times over, or 15 prompts of 1024
#: new tokens: about 20 s of the tiny model on one CPU thread.
MAX_REQUEST_TOKENS = 16384


def torch_adapter() -> Any:
    """``moe_record_torch``, or an error saying how to install it."""
    try:
        import moe_record_torch
    except ImportError:
        raise MoeRecordError(
            "the reference engine needs the torch adapter: pip install -e adapters/torch, from the moe-record-sdk checkout"
        ) from None
    return moe_record_torch


class ReferenceEngine:
    """A MoE model with a recorder attached, generating greedily one request at a time.

    Build one with :meth:`tiny` or :meth:`from_hf_config`; serve it with :meth:`app`.

    Example
    -------
    >>> engine = ReferenceEngine.tiny()  # doctest: +SKIP
    >>> engine.recorder.start()  # doctest: +SKIP
    >>> engine.generate([[1, 2, 3]], max_new_tokens=4)  # doctest: +SKIP
    """

    def __init__(self, model: torch.nn.Module, *, name: str, mode: str = "stat", **recorder_kwargs: Any) -> None:
        self.model = model.eval()
        self.name = name
        self.attachment = torch_adapter().attach(model, mode=mode, **recorder_kwargs)
        self.recorder = self.attachment.recorder
        self.vocab_size = int(_vocab_size(model))
        if self.vocab_size < 256:
            raise MoeRecordError(f"{name}: vocab_size {self.vocab_size} < 256: byte tokens would not fit")
        self._lock = threading.Lock()  # one request at a time: the model is the engine's only worker
        self.requests = 0  # prompts generated in full (each of a batch counts)

    @classmethod
    def tiny(
        cls,
        *,
        seed: int = 0,
        num_layers: int = 4,
        num_experts: int = 16,
        top_k: int = 2,
        mode: str = "stat",
        **recorder_kwargs: Any,
    ) -> ReferenceEngine:
        """The built-in ``TinyMoE`` (random weights from ``seed``)."""
        torch_adapter()  # its clear message, before the import below fails without one
        from moe_record_torch.tiny import TinyMoE, TinyMoEConfig

        config = TinyMoEConfig(num_layers=num_layers, num_experts=num_experts, top_k=top_k, seed=seed)
        return cls(
            TinyMoE(config), name=f"tiny-moe-{num_layers}x{num_experts}-top{top_k}", mode=mode, **recorder_kwargs
        )

    @classmethod
    def from_hf_config(cls, path: str, *, seed: int = 0, mode: str = "stat", **recorder_kwargs: Any) -> ReferenceEngine:
        """A transformers MoE model built from ``config.json`` (a file, or a folder holding one), random weights."""
        try:
            from transformers import AutoConfig, AutoModelForCausalLM
        except ImportError as e:
            raise MoeRecordError(f"--hf-config needs transformers: pip install transformers ({e})") from None

        folder = os.path.dirname(path) if os.path.isfile(path) else path
        if not os.path.isfile(path) and not os.path.isfile(os.path.join(folder, "config.json")):
            raise MoeRecordError(f"{path}: no config.json there")
        # The file given, whatever its name (its folder's config.json would be another model); a
        # config.json by its folder, so the model is named as vLLM and transformers name it.
        own = os.path.isfile(path) and os.path.basename(path) != "config.json"
        config = AutoConfig.from_pretrained(path if own else folder, local_files_only=True)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        name = getattr(config, "name_or_path", None) or f"{config.model_type} ({folder})"
        return cls(model, name=name, mode=mode, **recorder_kwargs)

    # -- generation ---------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]], max_new_tokens: int = 16, cancel: threading.Event | None = None
    ) -> list[list[int]]:
        """Greedy decoding of each prompt; returns the new tokens of each.

        ``cancel``: once set (the client went away, the server is shutting down), generation stops
        before the next prompt or token; the prompt under way is cut short, later ones are left out.
        The passes it ran stay recorded: they were real forward passes.
        """
        stop = cancel.is_set if cancel is not None else _never
        hf = hasattr(self.model, "config") and hasattr(self.model, "generation_config")
        outputs = []
        with self._lock:
            for ids in prompts:
                if stop():
                    break
                x = torch.tensor([ids], dtype=torch.long)
                if hf:
                    out = self.model.generate(
                        input_ids=x,
                        attention_mask=torch.ones_like(x),
                        max_new_tokens=max_new_tokens,
                        min_new_tokens=max_new_tokens,
                        do_sample=False,
                        pad_token_id=0,
                        stopping_criteria=_stopping(stop),
                    )
                else:
                    out = self.model.generate(x, max_new_tokens=max_new_tokens, stop=stop)
                outputs.append(out[0, len(ids) :].tolist())
                if len(outputs[-1]) == max_new_tokens:  # not cut short
                    self.requests += 1
        return outputs

    def parse_request(self, body: bytes) -> tuple[list[list[int]], int, bool]:
        """(prompts as ids, max_new_tokens, whether the request was a batch); 400 when malformed."""
        try:
            req = json.loads(body or b"{}")
        except (ValueError, RecursionError) as e:
            raise ControlError(400, "bad_body", f"body: not JSON ({e})") from None
        if not isinstance(req, dict):
            raise ControlError(400, "bad_body", "body: expected a JSON object")
        sampling = req.get("sampling_params") or {}
        n = req.get("max_new_tokens", sampling.get("max_new_tokens", 16) if isinstance(sampling, dict) else 16)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_NEW_TOKENS:
            raise ControlError(
                400, "bad_body", f"max_new_tokens: expected an integer in [1, {MAX_NEW_TOKENS}], got {n!r}"
            )
        if ("text" in req) == ("input_ids" in req):
            raise ControlError(400, "bad_body", "body: give exactly one of text, input_ids")
        if "text" in req:
            texts, batch = req["text"], isinstance(req["text"], list)
            texts = texts if batch else [texts]
            if not texts or not all(isinstance(t, str) and t for t in texts):
                raise ControlError(400, "bad_body", "text: expected a non-empty string or list of them")
            try:
                prompts = [list(t.encode("utf-8")) for t in texts]
            except UnicodeEncodeError as e:  # a lone surrogate ("\ud800" in the JSON)
                raise ControlError(400, "bad_body", f"text: not valid Unicode ({e.reason})") from None
        else:
            ids = req["input_ids"]
            batch = isinstance(ids, list) and bool(ids) and isinstance(ids[0], list)
            prompts = ids if batch else [ids]
            ok = isinstance(prompts, list) and bool(prompts)
            ok = ok and all(
                isinstance(p, list) and p and all(isinstance(i, int) and not isinstance(i, bool) for i in p)
                for p in prompts
            )
            if not ok:
                raise ControlError(
                    400, "bad_body", "input_ids: expected a non-empty list of integers, or a list of them"
                )
            bad = [i for p in prompts for i in p if not 0 <= i < self.vocab_size]
            if bad:
                raise ControlError(
                    400, "bad_body", f"input_ids: {bad[0]} is outside the vocabulary [0, {self.vocab_size})"
                )
        if any(len(p) > MAX_PROMPT_TOKENS for p in prompts):
            raise ControlError(400, "bad_body", f"prompt longer than {MAX_PROMPT_TOKENS} tokens")
        work = sum(len(p) for p in prompts) + n * len(prompts)
        if work > MAX_REQUEST_TOKENS:
            raise ControlError(
                400, "bad_body", f"request: {work} tokens (prompt tokens + max_new_tokens, over its "
                f"{len(prompts)} prompts), over the limit of {MAX_REQUEST_TOKENS} a request; split it",
            )  # fmt: skip
        return prompts, n, batch

    async def _generate_endpoint(
        self, method: str, query: dict[str, str], headers: dict[str, str], body: bytes
    ) -> Response:
        prompts, n, batch = self.parse_request(body)
        cancel = threading.Event()
        try:
            outputs = await asyncio.to_thread(self.generate, prompts, n, cancel)
        except asyncio.CancelledError:
            # The app cancels this call when the client disconnects or the server shuts down; the
            # worker thread cannot be cancelled, so it is told to stop at its next token (which
            # frees the engine for the next request).
            cancel.set()
            raise
        answers = [
            {
                "text": bytes(i for i in out if i < 256).decode("utf-8", errors="replace"),
                "output_ids": out,
                "meta_info": {"prompt_tokens": len(p), "completion_tokens": len(out)},
            }
            for p, out in zip(prompts, outputs)
        ]
        doc = answers if batch else answers[0]
        data = json.dumps(doc).encode()
        return Response(200, {"content-type": "application/json", "content-length": str(len(data))}, data)

    async def _health(self, method: str, query: dict[str, str], headers: dict[str, str], body: bytes) -> Response:
        return Response(200, {"content-type": "text/plain; charset=utf-8", "content-length": "3"}, b"ok\n")

    # -- serving ------------------------------------------------------------------------------
    def app(
        self,
        *,
        dump_dir: str,
        api_key: str | None = None,
        enabled: bool = True,
        max_body: int = DEFAULT_MAX_BODY,
        local_only: bool = False,
    ) -> ControlApp:
        """The ASGI app: control endpoints, ``POST /generate`` and ``GET /health``."""
        extra = [
            AppRoute("/generate", self._generate_endpoint, ("POST",)),
            AppRoute("/health", self._health, ("GET",), public=True),
        ]
        return make_app(
            LocalBackend(self.recorder), dump_dir=dump_dir, api_key=api_key, enabled=enabled, max_body=max_body,
            engine=self.recorder.engine.name, extra=extra, local_only=local_only,
        )  # fmt: skip


def _never() -> bool:
    return False


def _stopping(stop: Any) -> Any:
    """A transformers ``StoppingCriteriaList`` ending generation once ``stop()`` is True."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Stop(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            return torch.full((input_ids.shape[0],), stop(), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([Stop()])


def _vocab_size(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    size = getattr(config, "vocab_size", None)
    if size is None:
        text = getattr(config, "get_text_config", None)
        size = getattr(text(), "vocab_size", None) if callable(text) else None
    if size is None:
        raise MoeRecordError(f"{type(model).__name__}: cannot tell its vocab_size")
    return size
