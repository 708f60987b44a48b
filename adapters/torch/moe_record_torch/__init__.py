"""moe-record-torch: record the expert load of any PyTorch / transformers MoE model.

Example::

    from moe_record_torch import attach

    att = attach(model)            # finds the routers, builds a Recorder sized for the model
    att.recorder.start()
    model.generate(...)            # one forward pass per generation step
    dump = att.recorder.dump()     # counts per layer x expert, exact
    att.detach()                   # the model is exactly as before
"""

from .routers import Extract, Router, find_routers, ids_at, int_ids_in_output, topk_of_logits
from .tap import attach, layer_map
from .version import SUPPORTED, __version__

__all__ = [
    "SUPPORTED",
    "Extract",
    "Router",
    "__version__",
    "attach",
    "find_routers",
    "ids_at",
    "int_ids_in_output",
    "layer_map",
    "topk_of_logits",
]
