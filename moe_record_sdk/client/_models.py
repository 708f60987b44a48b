"""Result models shared by the sync and async fleet clients."""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..errors import EngineError
from ..schema import FORMATS

if TYPE_CHECKING:
    from ..schema import Dump

#: Where a dump went.
IN_RESPONSE = "response"  # the dump's bytes came back and are in ``EngineResult.dump``
ON_SERVER = "server-disk"  # only a file on the engine's disk (stock SGLang)


def run_file_kind(name: str) -> str | None:
    """``"engine"``, ``"merged"`` or ``"partial"`` for a file name :meth:`FleetResult.save`
    writes (what ``record --out`` holds), else None: the one place that knows those names."""
    stem, dot, fmt = name.rpartition(".")
    if not dot or fmt not in FORMATS:
        return None
    if stem == "merged":
        return "merged"
    return next((kind for kind in ("engine", "partial") if stem.startswith(f"{kind}-")), None)


@dataclass
class EngineResult:
    """One engine's outcome for one action.

    ``ok`` is False with ``error`` (a sentence) and ``error_kind`` (a word: ``connect``,
    ``timeout``, ``http``, ``protocol``, ``restarted``, ``run_changed``, ``window_taken``,
    ``stopped_early``, ``bad_dump``, ``duplicate``, ``not_started``) when the call failed. ``flavor`` says what answered: ``moe-record`` (our endpoints) or ``sglang``
    (SGLang's plain-text answers, as a stock server gives).
    """

    engine: str
    action: str
    ok: bool
    status_code: int | None = None
    elapsed: float = 0.0
    """Seconds from the first request to the final answer, retries included."""
    attempts: int = 1
    error: str | None = None
    error_kind: str | None = None
    flavor: str | None = None
    instance_id: str | None = None
    run_id: str | None = None
    window: int | None = None
    """Which window of the run (a dump's: the one it delivers); None where the engine does not say."""
    stopped_by: str | None = None
    """The client whose stop ended the run (its ``client_id``; ``*``: one that named none), as
    the answer says; None while the run records, or where the engine does not say."""
    resent: bool = False
    """A dump's window sent again (its first answer did not arrive: ``x-moe-record-resend``)."""
    info: dict[str, Any] | None = None
    """The JSON answer of our endpoints (status, identity, files...)."""
    dump: Dump | None = field(default=None, repr=False)  # tensors: describe() says what it holds
    """The engine's dump (its ranks merged), when its bytes came back."""
    location: str | None = None
    """Where the dump went: ``response`` (in ``dump``) or ``server-disk`` (only a file there)."""
    files: list[str] = field(default_factory=list)
    """Dump files the engine wrote, as paths on the engine's disk."""
    note: str | None = None
    """Something worth knowing that is not an error (e.g. a stock SGLang ignores ``mode``)."""
    server_timing: dict[str, float] = field(default_factory=dict)
    """The engine's ``Server-Timing`` header, milliseconds by name (``dump``, ``encode``)."""

    def describe(self) -> str:
        """One line for people: engine, ok or the error, timing, where the dump went (what the
        engine said made :func:`printable`)."""
        return printable(self._describe())

    def _describe(self) -> str:
        head = f"{self.engine} {self.action}: "
        if not self.ok:
            return head + f"FAILED ({self.error_kind}) {self.error} [{self.elapsed * 1000:.0f} ms]"
        where = ""
        if self.location == IN_RESPONSE and self.dump is not None:
            w = self.dump.window
            drops = ((w.dropped_passes, "pass", "passes"), (w.dropped_tokens, "token", "tokens"))
            lost = [f"{n} {one if n == 1 else many} dropped" for n, one, many in drops if n]
            where = f", dump collected ({', '.join([f'{w.num_passes} passes', *lost])})"
        elif self.location == ON_SERVER:
            where = ", dump left on the server's disk" + (f": {', '.join(self.files)}" if self.files else "")
        note = f" ({self.note})" if self.note else ""
        return head + f"ok{where}{note} [{self.elapsed * 1000:.0f} ms]"


def printable(text: str) -> str:
    """``text`` with its control and format characters escaped (``\\x1b``, ``\\u202e``): what an
    engine says reaches the user's terminal, where an escape sequence could clear the screen,
    retitle the window or hide a link, and a newline forge a line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


@dataclass
class FleetResult:
    """The outcome of one action over every engine of a fleet, in the fleet's engine order.

    For a dump, ``merged`` is the merge of every collected dump (None when none came back, or
    ``merge_error`` says why they could not be merged).
    """

    action: str
    results: list[EngineResult]
    elapsed: float = 0.0
    merged: Dump | None = field(default=None, repr=False)
    merge_error: str | None = None

    def __str__(self) -> str:
        """For people: how many engines succeeded, a line each (``describe``), and the merge."""
        lines = [
            f"{self.action}: {len(self.succeeded)} of {len(self.results)} engines ok [{self.elapsed * 1000:.0f} ms]"
        ]
        lines += ["  " + r.describe() for r in self.results]
        if self.merged is not None:
            w = self.merged.window
            lines.append(f"  merged: {len(self.dumps)} dumps, {w.mode}, {w.num_passes} passes")
        elif self.merge_error:
            lines.append(f"  merge failed: {self.merge_error}")
        return "\n".join(lines)

    @property
    def ok(self) -> bool:
        """Every engine succeeded (and, for a dump, the merge too)."""
        return all(r.ok for r in self.results) and self.merge_error is None

    @property
    def succeeded(self) -> list[EngineResult]:
        return [r for r in self.results if r.ok]

    @property
    def failed(self) -> list[EngineResult]:
        return [r for r in self.results if not r.ok]

    @property
    def dumps(self) -> dict[str, Dump]:
        """Collected dumps of the engines that succeeded, by engine URL."""
        return {r.engine: r.dump for r in self.results if r.ok and r.dump is not None}

    def __iter__(self) -> Iterator[EngineResult]:
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, key: int | str) -> EngineResult:
        """By position, or by engine URL as given to the fleet (``host:port`` works too)."""
        if isinstance(key, int):
            return self.results[key]
        from .fleet import normalize_engine

        try:
            url = normalize_engine(key)
        except ValueError:
            raise KeyError(key) from None
        for r in self.results:
            if r.engine == url:
                return r
        raise KeyError(key)

    def raise_for_errors(self) -> FleetResult:
        """Raise :class:`~moe_record_sdk.EngineError` listing every failure; else return self."""
        problems = [r.describe() for r in self.failed]
        if self.merge_error:
            problems.append(f"merge: {self.merge_error}")
        if problems:
            raise EngineError(
                f"{self.action} failed on {len(self.failed)} of {len(self.results)} engines: " + "; ".join(problems)
            )
        return self

    def save(self, directory: str, *, format: str = "pt") -> dict[str, str]:
        """Write each collected dump and the merge into ``directory``.

        Files are ``engine-<i>-<host>_<port>.<format>`` (``i`` the engine's position in the fleet)
        and ``merged.<format>`` (:func:`run_file_kind` knows them). A dump taken but left out of
        the merge (``run_changed``, ``window_taken``, ``stopped_early``: another client restarted,
        dumped or stopped the run meanwhile) is saved too, as
        ``partial-<i>-<host>_<port>.<format>``: the engine gave its window away with it.
        Returns ``{engine URL or "merged": path}``. A file of that name already there is never
        replaced (another run's, saved meanwhile); that, or any write that fails, raises
        :class:`SaveError`, which lists the files written before it.
        """
        from ..schema import save_dump

        todo = [
            (r.engine, r.dump, f"{'engine' if r.ok else 'partial'}-{i}-{engine_slug(r.engine)}.{format}")
            for i, r in enumerate(self.results)
            if r.dump is not None
        ]
        if self.merged is not None:
            todo.append(("merged", self.merged, f"merged.{format}"))
        paths: dict[str, str] = {}
        written: dict[int, str] = {}  # id(dump) -> its file
        try:
            os.makedirs(directory, exist_ok=True)
            for key, dump, name in todo:
                path = os.path.join(directory, name)
                same = written.get(id(dump))
                if same is not None and _link(same, path):  # one engine's merge is its dump: not written twice
                    paths[key] = path
                    continue
                paths[key] = written[id(dump)] = save_dump(dump, path, exclusive=True)
        except OSError as e:
            raise SaveError(e, paths) from e
        return paths


def _link(existing: str, path: str) -> bool:
    """``path`` as a second name of ``existing`` (a hard link: no second copy of a large dump);
    False where the file system has none. An existing ``path`` raises, as a save would."""
    try:
        os.link(existing, path)
    except FileExistsError:  # named as a save names it: the file in the way, not the one linked
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path) from None
    except OSError:
        return False
    return True


class SaveError(OSError):
    """:meth:`FleetResult.save` could not write every file: ``saved`` holds those it did write
    (whole files), by engine URL or ``"merged"``."""

    def __init__(self, error: OSError, saved: dict[str, str]) -> None:
        super().__init__(error.errno, error.strerror, error.filename)
        self.saved = saved


def engine_slug(url: str) -> str:
    """A file-name-safe short name for an engine URL: ``127.0.0.1_30000``."""
    parts = urlsplit(url)
    host = (parts.hostname or "engine").replace(":", "-")  # an IPv6 address: ::1 -> --1, distinct from 1
    name = f"{host}_{parts.port}" if parts.port else host
    if parts.path.strip("/"):
        name += "_" + parts.path.strip("/")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)
