"""moe-record-sglang: our recorder behind SGLang's own expert-distribution hooks, endpoints and files.

Installed, it registers the ``sglang.srt.plugins`` entry point ``moe_record``; SGLang's
``load_plugins()`` runs it in every process (``SGLANG_PLUGINS`` may whitelist it). Start SGLang
with ``--expert-distribution-recorder-mode stat|per_pass|per_token`` as usual. Set
``MOE_RECORD_SGLANG_PORT`` for our HTTP extensions per rank (:mod:`.side_server`).
"""

from .compat import check_sglang_version, sglang_version
from .plugin import build_recorder, install, register, uninstall
from .recorder import SGLangRecorder
from .topology import sglang_topology
from .version import SUPPORTED, __version__

__all__ = [
    "SGLangRecorder",
    "SUPPORTED",
    "__version__",
    "build_recorder",
    "check_sglang_version",
    "install",
    "register",
    "sglang_topology",
    "sglang_version",
    "uninstall",
]
