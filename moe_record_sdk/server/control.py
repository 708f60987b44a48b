"""The control layer, free of any web framework: a backend protocol and the operations over it.

A **backend** is whatever reaches the recorders of one engine: :class:`LocalBackend` wraps a
:class:`~moe_record_sdk.Recorder` in this process; the vLLM adapter's backend calls its workers
through ``collective_rpc``. It answers one entry per rank.

The :class:`Controller` adds what every engine needs on top: which mode names are valid, the
engine's identity (a per-process ``instance_id``), the ``run_id`` of the current recording and
the number of its current ``window`` and who stopped it, so a client can tell that an engine restarted, or that
another client restarted, dumped or stopped its run, between its start and its dump; merging several
ranks into one dump; writing dump files, only into the configured directory and with SGLang's
names; and "nothing recorded" as an error rather than an empty file.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..recorder import Recorder
from ..schema import MODES, Dump, save_dump, sglang_file_name
from .protocol import ANONYMOUS

log = logging.getLogger(__name__)


class ControlError(Exception):
    """A control request that cannot be served: ``status`` (HTTP code), a stable ``code`` word
    for programs, and a message for people."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


@runtime_checkable
class Backend(Protocol):
    """What the endpoints drive: the recorders of one engine, one entry per rank.

    Each method may be called concurrently with forward passes; the Controller never calls two
    of ``start``/``stop``/``dump`` at once.
    """

    async def start(self, mode: str | None) -> None:
        """Clear and start recording on every rank (``None``: the recorder's current mode)."""

    async def stop(self) -> None:
        """Stop recording on every rank."""

    async def dump(self) -> list[Dump]:
        """Every rank's dump of the current window (then each rank starts a new window)."""
        ...

    async def status(self) -> list[dict[str, Any]]:
        """Every rank's ``Recorder.status().to_dict()``, plus ``rank``."""
        ...


def holds_some_ranks(backend: Any) -> bool:
    """Whether ``backend`` serves only some of its run's data-parallel ranks by design (vLLM
    behind an external load balancer: one API server per DP rank or node), an optional
    attribute ``some_ranks``: its ranks are then merged as they are, the others' token shards
    left to the other servers (a Fleet over all of them sums them)."""
    return bool(getattr(backend, "some_ranks", False))


class LocalBackend:
    """A backend over recorders in this process (one per rank; usually one).

    Recorder calls run in a worker thread: a dump copies device buffers and must not stall the
    event loop that serves the engine.

    ``some_ranks``: these recorders are some of their run's data-parallel ranks, the others
    served elsewhere (see :func:`holds_some_ranks`).

    >>> backend = LocalBackend(Recorder(num_layers=2, num_experts=8, top_k=2))
    """

    def __init__(self, *recorders: Recorder, some_ranks: bool = False) -> None:
        if not recorders:
            raise ValueError("LocalBackend needs at least one Recorder")
        self.recorders, self.some_ranks = recorders, some_ranks

    async def _each(self, fn: Any) -> list[Any]:
        return await asyncio.to_thread(lambda: [fn(r) for r in self.recorders])

    async def start(self, mode: str | None) -> None:
        await self._each(lambda r: r.start(mode))

    async def stop(self) -> None:
        await self._each(lambda r: r.stop())

    async def dump(self) -> list[Dump]:
        return await self._each(lambda r: r.dump())

    async def status(self) -> list[dict[str, Any]]:
        return await self._each(lambda r: {"rank": r.topology.rank, **r.status().to_dict()})


@dataclass
class DumpOutcome:
    """What one dump produced: the ranks' dumps, their merge, and the files written."""

    dumps: list[Dump]
    merged: Dump
    files: list[str] = field(default_factory=list)
    run_id: str | None = None
    """The run the window belongs to (a start may have begun another since)."""
    window: int | None = None
    """Which window of that run this is: 1 from the start, then one more per dump."""
    stopped_by: str | None = None
    """Who had stopped the run when the window was taken (``Controller.stopped_by``)."""
    client: str | None = None
    """The client it was taken for, then the one it was last answered to (``H_CLIENT``): the
    one to whom it may be sent again."""
    resent: bool = False
    """Whether this dump request asked for it again (``H_RESEND``), its earlier answer lost."""


def merge_ranks(dumps: list[Dump], *, some_ranks: bool = False) -> Dump:
    """One dump from the ranks of one engine (the dump itself when there is one rank).
    ``some_ranks``: the engine serves only some token shards by design (``holds_some_ranks``)."""
    if len(dumps) == 1:
        return dumps[0]
    from ..merge import merge_dumps

    return merge_dumps(dumps, sources=[f"rank {d.topology.rank}" for d in dumps], allow_partial=some_ranks)


class Controller:
    """start / stop / dump / status over a backend, with identity, run ids and dump files.

    Parameters
    ----------
    backend:
        The engine's recorders (see :class:`Backend`).
    dump_dir:
        The only directory dump files are written to (created when missing). A request never
        chooses a path.
    engine:
        Engine name reported in answers (``torch``, ``vllm``, ``sglang``...).

    Example
    -------
    >>> ctl = Controller(LocalBackend(Recorder(2, 8, 2)), dump_dir="/tmp")
    >>> ctl.identity()["instance_id"] == ctl.instance_id
    True
    """

    def __init__(self, backend: Backend, *, dump_dir: str, engine: str = "torch") -> None:
        self.backend = backend
        self.dump_dir = os.path.abspath(dump_dir)
        self.engine = engine
        # A fresh id per process: a client that sees it change knows the engine restarted and
        # that whatever it started there is gone.
        self.instance_id = uuid.uuid4().hex[:16]
        self.started_at = time.time()
        self.run_id: str | None = None
        self.run_started_at: float | None = None
        # The run's window being recorded: 1 from its start, one more with each dump (which takes
        # the window). A client that started the run and gets window 2 at its first dump knows
        # another client took the first part.
        self.window: int | None = None
        # The client of the first stop request since the run's start (ANONYMOUS: it named none);
        # None while no stop came.
        self.stopped_by: str | None = None
        self._runs = 0
        self._pending: DumpOutcome | None = None
        # The last window whose answer went out, until the next take or start: its client may not
        # have got it (an answer cut off on the way), and asks for it again by number (resend).
        self._sent: DumpOutcome | None = None
        self._lock: asyncio.Lock | None = None
        self._delivery: asyncio.Lock | None = None

    def _mutex(self) -> asyncio.Lock:
        # Created lazily: an asyncio.Lock belongs to the loop it is first used in.
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def delivering(self) -> asyncio.Lock:
        """Held by a server around a dump, from the request until its answer is on its way or
        handed back (``keep``): the next dump waits, so it delivers a window given back before it
        rather than taking the next one ahead of it."""
        if self._delivery is None:
            self._delivery = asyncio.Lock()
        return self._delivery

    def identity(self) -> dict[str, Any]:
        """Engine identity and the current run, as every JSON answer reports them."""
        return {
            "engine": self.engine,
            "instance_id": self.instance_id,
            "instance_started_at": self.started_at,
            "run_id": self.run_id,
            "run_started_at": self.run_started_at,
            "window": self.window,
            "stopped_by": self.stopped_by,
        }

    @staticmethod
    def check_mode(mode: Any) -> str | None:
        if mode is None or mode == "":
            return None
        if not isinstance(mode, str) or mode not in MODES:
            raise ControlError(400, "unknown_mode", f"mode: {mode!r} is not one of {', '.join(MODES)}")
        return mode

    async def start(self, mode: str | None = None) -> str:
        """Clear and start recording; returns the new ``run_id``. A window kept after a failed
        dump is cleared too: a start means its caller moved on, and a dump after it must
        deliver the new run, not the old window under the new run's id."""
        mode = self.check_mode(mode)
        async with self._mutex():
            await self.backend.start(mode)
            if self._pending is not None:
                log.warning("start: the window kept since a failed dump (run %s) is cleared", self._pending.run_id)
                self._pending = None
            self._sent = None
            self._runs += 1
            self.run_id = f"{self.instance_id}-{self._runs}"
            self.run_started_at = time.time()
            self.window, self.stopped_by = 1, None
            return self.run_id

    async def stop(self, client: str | None = None) -> bool:
        """Stop recording; what was recorded stays until the next dump or start. Returns whether
        an earlier stop request had already stopped this run (another client's, or a repeat):
        a client that started the run learns that its window ended before its own stop.
        ``client``: the stopping client's id, kept as ``stopped_by`` by the run's first stop."""
        async with self._mutex():
            await self.backend.stop()
            already = self.stopped_by is not None
            if not already:
                self.stopped_by = client or ANONYMOUS
            return already

    async def status(self) -> list[dict[str, Any]]:
        """Each rank's status."""
        return await self.backend.status()

    async def dump(
        self, *, write_files: bool = True, client: str | None = None, resend: int | None = None
    ) -> DumpOutcome:
        """Collect the window from every rank, merge the ranks, optionally write SGLang's files.

        ``client`` asking for window number ``resend`` again: when the last window answered
        (``sent``) is that one, answered to that client, it is given again instead of a new one
        being taken (that answer did not arrive). Otherwise these change nothing.

        Raises ``ControlError(409)`` when nothing was ever recorded. Once collected, the window
        is not dropped (the recorders have already started a new one): if writing fails
        (``ControlError(500)``), it is kept and the next dump delivers it (the new window stays
        for the dump after), unless a start clears it first; ``keep`` does the same for a
        failure after this call (encoding the answer). Ranks whose dumps do not merge are
        written one file each, and the 500 names them.
        """
        async with self._mutex():
            outcome = self._pending
            self._pending = None
            if outcome is None and self._asks_again(self._sent, client, resend):
                outcome = self._sent
            if outcome is not None:
                # Set for this request (it is read as the dump returns): the window was this
                # client's, as it asks; a kept window going to another client is not "again".
                outcome.resent = self._asks_again(outcome, client, resend)
            else:
                self._sent = None  # a new window is taken: the last one's client moved on
                if self.run_id is None:
                    ranks = await self.backend.status()
                    if not any(s.get("recording") or s.get("passes") or s.get("tokens") for s in ranks):
                        raise ControlError(
                            409,
                            "nothing_recorded",
                            "nothing was recorded: start recording (/start_expert_distribution_record) first",
                        )
                dumps = await self.backend.dump()
                window = self.window
                if window is not None:
                    self.window = window + 1  # the recorders began the next window as they dumped
                try:
                    merged = merge_ranks(dumps, some_ranks=holds_some_ranks(self.backend))
                except Exception as e:  # noqa: BLE001 - ranks left inconsistent: their windows are taken
                    raise ControlError(500, "dump_merge_failed", await self._salvage(dumps, e)) from None
                outcome = DumpOutcome(
                    dumps, merged, run_id=self.run_id, window=window, stopped_by=self.stopped_by, client=client
                )
            if write_files and not outcome.files:  # a window sent again keeps the files it has
                todo = [outcome.merged] if outcome.merged.mode == "stat" else outcome.dumps
                try:
                    outcome.files = await asyncio.to_thread(self._write, todo)
                except Exception as e:  # noqa: BLE001 - a full disk, a count SGLang's .pt cannot hold...
                    self._pending, self._sent = outcome, None  # kept for anyone's next dump: not sent twice
                    why = (e.strerror or e) if isinstance(e, OSError) else e
                    raise ControlError(
                        500,
                        "dump_write_failed",
                        f"cannot write the dump to {self.dump_dir}: {why}; the recording is kept: retry the dump, "
                        "or collect it with return=bytes",
                    ) from None
            return outcome

    def _asks_again(self, outcome: DumpOutcome | None, client: str | None, number: int | None) -> bool:
        """Whether ``client`` asks for ``outcome``, a window already taken for it, by its number."""
        return (
            outcome is not None
            and client is not None
            and (outcome.client, outcome.window, outcome.run_id) == (client, number, self.run_id)
        )

    def sent(self, outcome: DumpOutcome, client: str | None) -> None:
        """``outcome``'s answer is on its way to ``client``: kept until the next take or start, so
        that client can ask for it again (``dump(client=, resend=)``) should the answer not
        arrive. A client without an id could not ask: nothing is kept for it."""
        outcome.client = client
        self._sent = outcome if client is not None else None

    def keep(self, outcome: DumpOutcome) -> None:
        """Keep a collected window that could not be delivered, for the next dump; unless a start
        came since, which clears a kept window (its caller moved on to a new run)."""
        self._sent = None  # kept for anyone's next dump: not to be sent twice
        if outcome.run_id != self.run_id:
            log.warning(
                "dump: run %s's window was not delivered, and a start came since: it is dropped", outcome.run_id
            )
        elif self._pending is not None:  # a dump's turn (delivering) keeps this from happening
            log.error("dump: a window is kept already; window %s of run %s is lost", outcome.window, outcome.run_id)
        else:
            self._pending = outcome

    async def _salvage(self, dumps: list[Dump], error: Exception) -> str:
        """What to answer when the ranks' dumps do not merge: each rank's is written as a file of
        its own, the only copies left (the recorders started new windows)."""
        log.error("dump: the ranks' dumps do not merge (%s); writing each rank's", error)
        try:
            files = await asyncio.to_thread(self._write, dumps, "msgpack")  # holds any count
        except Exception as e:  # noqa: BLE001
            log.exception("dump: the ranks' dumps could not be written either: the window is lost")
            return f"the ranks' dumps do not merge: {error}; writing each rank's failed too ({e}): the window is lost"
        return f"the ranks' dumps do not merge: {error}; each rank's dump is written instead: {', '.join(files)}"

    def _write(self, todo: list[Dump], fmt: str = "pt") -> list[str]:
        """Write SGLang's files: one for a stat dump (the merge, as rank 0 writes it), else one
        per rank (named as SGLang names them, in ``fmt``).

        A stat dump of one rank of a larger world (an SGLang side server's) holds that rank's
        counts only: it is named by its rank, so nothing takes it for SGLang's global file."""
        os.makedirs(self.dump_dir, exist_ok=True)
        paths = []
        for dump in todo:
            now, per_rank = time.time(), True if dump.topology.world_size > 1 else None
            while True:
                name = os.path.splitext(sglang_file_name(dump, now=now, per_rank=per_rank))[0] + "." + fmt
                path = os.path.join(self.dump_dir, name)
                if not os.path.exists(path):
                    break
                now += 1e-6  # two dumps within one clock tick: never overwrite
            paths.append(save_dump(dump, path))
            log.info("Write expert distribution to %s", path)
        return paths
