"""The worker control methods' wire shape: plain data over ``collective_rpc``, errors as data.

vLLM turns an exception raised in a worker into a bare ``Exception`` with a formatted
message in the API process; returning ``{"moe_record_error": ...}`` instead keeps its type and
message, so the endpoints answer 400 for a bad request rather than 500.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any

from moe_record_sdk import errors

ERROR_KEY = "moe_record_error"


def errors_as_data(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a worker method; return a ``MoeRecordError`` as ``{ERROR_KEY: type, "message": ...}``."""

    @wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except errors.MoeRecordError as e:
            return {ERROR_KEY: type(e).__name__, "message": str(e)}

    return call


def raise_errors(results: list[Any]) -> list[Any]:
    """The ranks' results; the first rank's error raised again as its own type."""
    for r in results:
        if isinstance(r, dict) and ERROR_KEY in r:
            cls = getattr(errors, str(r[ERROR_KEY]), errors.MoeRecordError)
            if not (isinstance(cls, type) and issubclass(cls, errors.MoeRecordError)):
                cls = errors.MoeRecordError
            raise cls(r.get("message", ""))
    return results
