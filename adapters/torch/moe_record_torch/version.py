"""The adapter's version and the torch / transformers releases it was verified against."""

from __future__ import annotations

__version__ = "0.1.0"

#: torch releases supported (eager, ``torch.compile``); a PEP 440 specifier checked from package
#: metadata by the adapter registry before the adapter is used. The core's floor: from 2.10 its
#: ``.pt`` reader's ``weights_only=True`` is a safe boundary.
SUPPORTED = ">=2.10"

#: transformers releases whose MoE router modules (``mlp.gate`` / ``mlp.router`` returning
#: ``(router_logits, weights, topk_ids)``) were read and tested. Other releases still attach
#: through the explicit form (``routers=`` + ``extract=``).
TRANSFORMERS_SUPPORTED = ">=5.0,<6"
