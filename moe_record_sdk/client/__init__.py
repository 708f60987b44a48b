"""The httpx client of the expert-distribution endpoints: one engine or a whole fleet.

:class:`AsyncFleet` fans each action out to every engine at once; :class:`Fleet` is its
synchronous wrapper. A one-engine fleet is the single-engine client.
"""

from ._models import IN_RESPONSE, ON_SERVER, EngineResult, FleetResult
from .fleet import IDEMPOTENT, AsyncFleet, Fleet, merge_engines, normalize_engine

__all__ = [
    "IDEMPOTENT",
    "IN_RESPONSE",
    "ON_SERVER",
    "AsyncFleet",
    "EngineResult",
    "Fleet",
    "FleetResult",
    "merge_engines",
    "normalize_engine",
]
