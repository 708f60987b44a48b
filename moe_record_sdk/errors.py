"""The one exception tree of moe-record-sdk.

    MoeRecordError
    ├── DumpFormatError        a file or payload that is not a dump we can read
    │   └── SchemaVersionError a dump of a schema version this release does not know
    ├── DumpValidationError    a dump that decodes but breaks an invariant
    ├── RecorderError          a recorder misused (bad mode, layer, shape, state)
    ├── AdapterError           an adapter that cannot attach, or refuses an engine version
    ├── MergeError             dumps that cannot be merged (other model, experts, top_k)
    └── EngineError            an engine answered an HTTP control call with an error

Messages name the file, field or adapter and what was wrong.
"""

from __future__ import annotations


class MoeRecordError(Exception):
    """Base of every error this package raises on purpose."""


class DumpFormatError(MoeRecordError):
    """A file or payload that is not a dump in any format we read."""


class SchemaVersionError(DumpFormatError):
    """A dump written with a schema version this release does not know."""


class DumpValidationError(MoeRecordError):
    """A dump that breaks an invariant; ``problems`` lists ``(field path, message)``."""

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None) -> None:
        self.problems = problems
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(where + "; ".join(f"{path}: {msg}" for path, msg in problems))


class RecorderError(MoeRecordError):
    """A recorder called with a bad mode, layer, shape or in the wrong state."""


class AdapterError(MoeRecordError):
    """An adapter that cannot attach, or that refuses an engine version."""


class MergeError(MoeRecordError):
    """Dumps that cannot be merged; the message names the difference."""


class EngineError(MoeRecordError):
    """An engine answered a control call with an error."""
