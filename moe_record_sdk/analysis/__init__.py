"""Reading expert load: imbalance metrics, summaries, EPLB plans, plots and Prometheus metrics.

``plot`` and ``prometheus`` import their optional dependencies (``[plot]``, ``[metrics]``) only
when used; this package imports torch, msgspec and rich only.

>>> from moe_record_sdk import load_dump
>>> from moe_record_sdk.analysis import summarize, print_summary
>>> print_summary(summarize(load_dump("run.pt"), ep_size=8))  # doctest: +SKIP
"""

from .eplb import EplbPlan, rebalance, save_weight, trivial_placement
from .metrics import balancedness, cv, dead_experts, gpu_loads, hot_experts, imbalance_ratio, jain, max_over_mean
from .optional import MissingDependencyError
from .summary import (
    LayerSummary,
    LoadStats,
    Metrics,
    Overall,
    PassSummary,
    Summary,
    print_summary,
    summarize,
    to_csv,
    to_json,
)

__all__ = [
    "EplbPlan",
    "LayerSummary",
    "LoadStats",
    "Metrics",
    "MissingDependencyError",
    "Overall",
    "PassSummary",
    "Summary",
    "balancedness",
    "cv",
    "dead_experts",
    "gpu_loads",
    "hot_experts",
    "imbalance_ratio",
    "jain",
    "max_over_mean",
    "print_summary",
    "rebalance",
    "save_weight",
    "summarize",
    "to_csv",
    "to_json",
    "trivial_placement",
]
