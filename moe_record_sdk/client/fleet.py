"""Drive the expert-distribution endpoints of many engines at once, over httpx.

:class:`AsyncFleet` does the fan-out: one request per engine, all in flight together, each
with its own outcome (:class:`EngineResult`); a slow or dead engine costs the others nothing.
:class:`Fleet` is a thin synchronous wrapper returning the same results.

Works against our endpoints (the dump's bytes come back and are merged) and against a stock
SGLang server (plain-text answers; its dump stays on its disk, which the result says).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
import uuid
from collections.abc import Coroutine, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar
from urllib.parse import urlsplit

import httpx

from .. import env
from .._version import __version__
from ..errors import MoeRecordError
from ..schema import FORMATS
from ..server.protocol import (
    ANONYMOUS,
    DUMP_JSON,
    H_CLIENT,
    H_FILES,
    H_FORMAT,
    H_INSTANCE,
    H_MAX_BYTES,
    H_RESEND,
    H_RESENT,
    H_RUN,
    H_STOPPED_BY,
    H_WINDOW,
    MSGPACK,
    PATHS,
    PT,
    TEXTS,
    bearer_token_problem,
    check_client_id,
)
from ._http import KEEPALIVE_EXPIRY, Answer, BodyTooLarge, Http11Transport, Prepared, check_body_size
from ._models import IN_RESPONSE, ON_SERVER, EngineResult, FleetResult

if TYPE_CHECKING:
    from ..schema import Dump

T = TypeVar("T")

#: Actions that leave an engine as one call would when repeated: safe to retry after a lost
#: answer. A dump is not (it clears the window), so it is retried only when the request
#: provably never reached the engine (the connection was refused).
IDEMPOTENT = frozenset({"status", "start", "stop"})
_RETRY_STATUS = (502, 503, 504)
_INLINE_DECODE = 1 << 20
# A dump's failures after which the engine may hold this fleet's window (sent again on request).
_MAY_HAVE_TAKEN = frozenset({"connection", "timeout", "interrupted", "bad_dump", "protocol"})  # and 413s, 5xx
# httpx's own transport (https engines) expires idle connections before the engines' 5 s, as ours does.
_HTTPX_LIMITS = httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY)
_CONTROL_MAX_BODY = 16 << 20  # start/stop/status answers are a few hundred bytes; a dump is limited by max_dump_bytes
_SGLANG_DIR_HINT = "in the server's SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR (SGLang's default: /tmp)"


class _Run:
    """This fleet's run on one engine, as its start left it: what a dump expects to find."""

    def __init__(self, instance: str | None, run: str | None, window: int | None) -> None:
        self.instance, self.run = instance, run
        self.window = window  # the window the next dump should deliver (None: the engine does not say)
        self.stop_sent = False  # this fleet sent a stop there
        self.cut_short: str | None = None  # why the window ended before this fleet's stop
        # This fleet's last dump there got no answer (or none it could read): the engine may
        # have taken the window, which it keeps for this fleet's next dump (H_RESEND).
        self.unanswered = False


class _Call(NamedTuple):
    """One engine's request for one kind of call, built once."""

    request: httpx.Request
    prepared: Prepared | None  # ready for the lean transport; None: the engine has another transport
    resends: bool = False  # a dump that names the window it asks for (H_RESEND): safe to send again

    @property
    def asked(self) -> str | None:
        """The dump format this call asks for (None: no dump bytes)."""
        return self.request.url.params.get("format")


def normalize_engine(url: str) -> str:
    """``host:port`` or a URL -> ``http://host:port`` without a trailing slash. A bare host (no
    scheme, no port) is refused: a URL without a port means its scheme's (80, 443), a choice a
    bare host does not make."""
    given = url
    url = url.strip()
    if "@" in url:  # checked first, and never echoed: what comes before the @ may hold a password
        raise ValueError(
            f"engine: …@{url.rpartition('@')[2]} has credentials in the URL, which are never sent (and would be "
            "printed); give the bearer token with --api-key, --api-key-file or MOE_RECORD_API_KEY"
        )
    bare = "://" not in url
    if bare:
        url = "http://" + url
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"engine: {given!r} is not an http(s) URL")
    if parts.query or parts.fragment or url.endswith(("?", "#")):  # the endpoint path would land after it
        raise ValueError(f"engine: {given!r} has a query or fragment; give the engine's base URL")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"engine: {given!r} has no valid port (0-65535)") from None
    if bare and port is None:  # no engine serves on 80 by default: a forgotten port, not a choice
        raise ValueError(
            f"engine: {given!r} names no port; give host:port (SGLang serves on 30000, vLLM on 8000), "
            f"or a full URL such as http://{parts.netloc} for port 80"
        )
    # Scheme and host are case-insensitive: lowercased, one engine has one spelling (no duplicates).
    return parts._replace(scheme=scheme, netloc=parts.netloc.lower()).geturl().rstrip("/")


class AsyncFleet:
    """Start, stop, dump and query many engines concurrently.

    Parameters
    ----------
    engines:
        Engine base URLs (``http://10.0.0.1:30000`` or ``10.0.0.1:30000``); each at most once,
        so nothing is merged twice.
    api_key:
        Bearer token sent to every engine, or ``{url: token}``. Default: ``MOE_RECORD_API_KEY``;
        ``""`` sends none.
    timeout:
        Seconds allowed per request: for start, stop and status, the whole call (the connect
        and the whole answer); for a dump, the connect and each wait for the answer's next
        bytes, since moving a large window takes as long as it takes while bytes flow.
    retries:
        Extra attempts after a failure that is safe to retry (see ``IDEMPOTENT``; and a dump of
        this fleet's run after a dropped connection or a 502/503/504: it names the window it asks
        for, which the engine sends again if it had answered it already).
    transport:
        An ``httpx.AsyncBaseTransport`` (e.g. ``httpx.ASGITransport(app)``) instead of the network.
    headers:
        Sent with every request. An ``x-moe-record-client`` among them is this fleet's
        ``client_id`` (default: a random one), by which engines tell its stops and dumps from
        other clients'.
    max_concurrency:
        At most this many requests in flight (default: one per engine).
    max_dump_bytes:
        The largest dump answer taken from one engine (default: this machine's memory). A
        larger one is that engine's failure (``too_large``), refused before it is allocated.

    Example
    -------
    >>> async with AsyncFleet(["127.0.0.1:30000", "127.0.0.1:30001"]) as fleet:  # doctest: +SKIP
    ...     await fleet.start()
    ...     ...  # traffic
    ...     await fleet.stop()
    ...     result = await fleet.dump()
    >>> result.merged.total_count()  # doctest: +SKIP
    """

    def __init__(
        self,
        engines: Sequence[str] | str,
        *,
        api_key: str | Mapping[str, str] | None = None,
        timeout: float = 60.0,
        retries: int = 2,
        backoff: float = 0.1,
        transport: httpx.AsyncBaseTransport | None = None,
        headers: Mapping[str, str] | None = None,
        max_concurrency: int | None = None,
        max_dump_bytes: int | None = None,
    ) -> None:
        if isinstance(engines, str):
            engines = [engines]
        self.engines = [normalize_engine(e) for e in engines]
        if not self.engines:
            raise ValueError("engines: give at least one engine URL")
        dupes = sorted({e for e in self.engines if self.engines.count(e) > 1})
        if dupes:
            raise ValueError(f"engines: listed more than once (their counts would be merged twice): {', '.join(dupes)}")
        if api_key is None:
            api_key = env.api_key()
        self._keys: Mapping[str, str] = (
            {normalize_engine(k): v for k, v in api_key.items()}
            if isinstance(api_key, Mapping)
            else {e: api_key or "" for e in self.engines}
        )
        for engine, key in self._keys.items():
            problem = bearer_token_problem(key) if key else None
            if problem:
                raise ValueError(f"api_key for {engine}: {problem}")
        self.timeout = timeout
        self.max_dump_bytes = _memory_size() if max_dump_bytes is None else int(max_dump_bytes)
        self.retries = max(0, retries)
        self.backoff = backoff
        # Transports driven directly with requests built once: the client's CPU per request
        # bounds a fan-out (one event loop sends them all), and httpx.AsyncClient's per-request
        # work (URL parsing, cookies, auth and redirect flows) is none we need. Plain-http
        # engines share the lean transport (_http.py), which sends a fan-out in one batch;
        # https ones get httpx's own, one each.
        self._lean = Http11Transport() if transport is None else None
        self._transports: dict[str, httpx.AsyncBaseTransport] = {}
        for e in self.engines:
            if transport is not None:
                self._transports[e] = transport
            elif e.startswith("http://"):
                self._transports[e] = self._lean  # type: ignore[assignment]
            else:
                self._transports[e] = httpx.AsyncHTTPTransport(retries=0, limits=_HTTPX_LIMITS)
        # This fleet's id, sent with every request: an engine names the client whose stop ended
        # a run (stopped_by), so this fleet tells its own stop (retried, or sent again after one
        # cut short) from another client's.
        given = {k.lower(): v for k, v in (headers or {}).items()}
        self.client_id = check_client_id(given[H_CLIENT]) if H_CLIENT in given else uuid.uuid4().hex[:16]
        self._headers = {"user-agent": f"moe-record-sdk/{__version__}", **given, H_CLIENT: self.client_id}
        # Each kind of call's requests, built once: (their time limit, one per engine).
        self._calls: dict[tuple[Any, ...], tuple[float, list[_Call]]] = {}
        self.max_concurrency = max_concurrency
        # The cap, made for each event loop the fleet is used in (_call): a semaphore binds to one.
        self._sem: asyncio.Semaphore | None = None
        self._sem_loop: asyncio.AbstractEventLoop | None = None
        # engine -> this fleet's run there (_Run), or None when its start there failed: stop and
        # dump check it to catch what other clients did to the run meanwhile.
        self._runs: dict[str, _Run | None] = {}
        self._same_as: dict[str, str] = {}  # engine -> the entry listed first for that engine (start found it)
        self.cut_short: FleetResult | None = None
        """The outcomes so far of the last call, when it was cut short (Ctrl-C, a cancel): which
        engines had answered what, the others ``interrupted``."""

    # -- lifecycle ----------------------------------------------------------------------------
    async def aclose(self) -> None:
        unique = {id(t): t for t in self._transports.values()}  # a transport passed in serves every engine
        await asyncio.gather(*(t.aclose() for t in unique.values()))

    async def __aenter__(self) -> AsyncFleet:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- actions ------------------------------------------------------------------------------
    async def start(self, mode: str | None = None) -> FleetResult:
        """Clear and start recording everywhere (``mode``: ``stat``, ``per_pass``, ``per_token``)."""
        params = {"mode": mode} if mode else None
        result = await self._fan_out("start", self._calls_for("start", params, "application/json, text/plain;q=0.5"))
        self._same_as = {}
        for r in result:
            self._runs[r.engine] = _Run(r.instance_id, r.run_id, r.window) if r.ok else None
            if r.ok and mode and r.flavor == "sglang":
                r.note = "a stock SGLang server ignores mode: its --expert-distribution-recorder-mode applies"
        await self._one_entry_per_engine(result)
        return result

    async def _one_entry_per_engine(self, started: FleetResult) -> None:
        """One engine listed under two names (``localhost`` and ``127.0.0.1``) answered both
        starts: the second restarted the first's window. Its first entry follows the engine's
        current run; the others are reported and left out of stop and dump (counted once)."""
        seen: dict[str, list[EngineResult]] = {}
        for r in started:
            if r.ok and r.instance_id:
                seen.setdefault(r.instance_id, []).append(r)
        for same in (group for group in seen.values() if len(group) > 1):
            first = same[0]
            i = self.engines.index(first.engine)
            now = await self._call(first.engine, "status", self._calls_for("status", None, "application/json")[i])
            if now.ok:  # the run the other entries' starts began: the one first's stop and dump find
                self._runs[first.engine] = _Run(first.instance_id, now.run_id, now.window)
            for r in same[1:]:
                r.ok, r.error_kind = False, "duplicate"
                r.error = (
                    f"the same engine as {first.engine} (instance {r.instance_id}), listed twice: counted once there"
                )
                self._runs[r.engine], self._same_as[r.engine] = None, first.engine

    async def stop(self) -> FleetResult:
        """Stop recording everywhere. An engine whose recording another client stopped first is
        noted: its window ended there, and the dump reports it (``stopped_early``)."""
        first = {e for e, run in self._runs.items() if run is not None and not run.stop_sent}
        for e in first:
            self._runs[e].stop_sent = True  # type: ignore[union-attr]
        result = await self._fan_out("stop", self._calls_for("stop", None, "application/json, text/plain;q=0.5"))
        for r in result:
            run = self._runs.get(r.engine)
            if r.ok and run is None and (r.info or {}).get("already_stopped"):  # not this fleet's run: say so
                by = f" by client {r.stopped_by}" if r.stopped_by not in (None, ANONYMOUS) else ""
                r.note = f"already stopped{by}: nothing changed"
            if run is None or not r.ok:
                continue
            if r.stopped_by is not None:
                by_another = r.stopped_by != self.client_id
            else:  # an engine that does not name the stopping client: found stopped by this fleet's first
                # stop there, at its first attempt (a retry, or a stop sent again after one cut short,
                # may find its own)
                by_another = r.engine in first and r.attempts == 1 and bool((r.info or {}).get("already_stopped"))
            if by_another:
                run.cut_short = "another client stopped this run's recording before this fleet's stop"
                r.note = run.cut_short + ": the window ends there"
        return result

    async def status(self, *, timeout: float | None = None) -> FleetResult:
        """Each engine's identity, run and per-rank status (``EngineResult.info``).

        ``timeout``: this call's own, shorter one (a progress poll must not outlast its interval).
        """
        return await self._fan_out("status", self._calls_for("status", None, "application/json", timeout))

    async def dump(
        self,
        *,
        collect: bool = True,
        keep_files: bool = False,
        format: str = "msgpack",
        merge: bool = True,
        resend: int | None = None,
    ) -> FleetResult:
        """Dump everywhere; collect each engine's dump and merge them.

        ``collect=False`` asks only for SGLang's files on each engine's disk. ``keep_files``
        also writes them when collecting. An engine restarted since this fleet's ``start`` (or
        restarted by another client) is reported as failed and left out of the merge. Where a
        dump of this run failed after the engine took its window (the answer lost on the way),
        the next dump gets that window again (``x-moe-record-resend``).

        ``resend``: ask every engine for this window again, as an earlier process with this
        fleet's ``client_id`` would have (its error names both), in place of the windows this
        fleet's own run expects.
        """
        if format not in FORMATS:
            raise ValueError(f"format: {format!r} is not one of {', '.join(FORMATS)}")
        if collect:
            from ..schema import decode  # noqa: F401 - torch loads here, not inside the first engine's timing

            params = {"return": "both" if keep_files else "bytes", "format": format}
            accept = f"{MSGPACK if format == 'msgpack' else DUMP_JSON if format == 'json' else PT}, application/json;q=0.9, text/plain;q=0.5"
        else:
            params, accept = None, "application/json, text/plain;q=0.5"
        # The window each engine owes this run: one this fleet was answered before, lost on the
        # way (a retry, or this fleet's next dump), is sent again instead of a new one taken.
        if resend is not None:
            windows = dict.fromkeys(self.engines, resend)
        else:
            windows = {e: run.window for e, run in self._runs.items() if run is not None and run.window}
        self.cut_short = None
        try:
            calls = self._calls_for(
                "dump", params, accept, per_engine={e: {H_RESEND: str(w)} for e, w in windows.items()}
            )
            result = await self._fan_out("dump", calls)
        except BaseException:  # cut short: the windows that did arrive are this fleet's, not to be sent again
            for r in self.cut_short or ():
                self._check_run(r)
            raise
        for r in result:
            self._check_run(r)
            if resend is not None and r.ok and not r.resent:
                r.note = (
                    f"window {resend} was not sent again (the engine keeps no such window for client "
                    f"{self.client_id}): this dump took the window it was recording"
                    + (f", window {r.window}" if r.window is not None else "")
                )
        if merge:
            collected = [r for r in result if r.ok and r.dump is not None]
            if collected:
                try:
                    dumps, names = [r.dump for r in collected], [r.engine for r in collected]
                    result.merged = await asyncio.to_thread(merge_engines, dumps, names)
                except MoeRecordError as e:
                    result.merge_error = str(e)
                except Exception as e:  # noqa: BLE001 - even a bug: the engines' dumps are taken, keep them
                    result.merge_error = f"{type(e).__name__}: {e}"
        return result

    def cut_into(self, status: EngineResult) -> str | None:
        """What befell this fleet's run on ``status``'s engine since its start, read from a status
        answer (``record`` says it while recording); None when nothing did, or nothing is known."""
        run = self._runs.get(status.engine)
        info = status.info if status.ok else None
        if run is None or not info:
            return None
        if info.get("instance_id") not in (None, run.instance):
            return "the engine restarted: what it recorded is lost"
        if run.run and info.get("run_id") != run.run:
            return "another client restarted the run: its dump will be partial"
        stopped_by = status.stopped_by
        if (stopped_by is not None and stopped_by != self.client_id) or (
            "stopped_by" not in info and info.get("recording") is False and not run.stop_sent
        ):
            return "another client stopped the run: its dump will be partial"
        window = info.get("window")
        # After a dump of this fleet's that got no answer, the engine may be a window further on:
        # the one it keeps for this fleet.
        if run.window and window not in (None, run.window) and not (run.unanswered and window == run.window + 1):
            return "another client's dump took part of the run: its dump will be partial"
        return None

    # -- one engine ---------------------------------------------------------------------------
    def _check_run(self, r: EngineResult) -> None:
        """Fail a dump that is not this fleet's whole window: the engine restarted, or another
        client restarted the run, took part of it with a dump, or stopped it early."""
        run = self._runs.get(r.engine)
        if run is None:  # never started by this fleet, or not dumped (_fan_out)
            return
        # Also for error answers: a restarted engine answers "nothing recorded", and the restart is the news.
        if run.instance and r.instance_id and run.instance != r.instance_id:
            r.ok, r.error_kind = False, "restarted"
            r.error = (
                f"engine restarted since start (instance {run.instance} -> {r.instance_id}): what it recorded was lost"
            )
            return
        if not r.ok:
            if r.files and r.window is not None:  # the window went into the engine's files: it moved on
                run.window = r.window
            elif run.window and r.error_kind in _MAY_HAVE_TAKEN:
                run.unanswered = True
                r.error += (
                    f"; the engine keeps window {run.window} for this fleet (client {self.client_id}): its next dump "
                    f"gets it, as does `moe-record dump -e {r.engine} --client-id {self.client_id} --resend {run.window} "
                    "--out NEW_DIR` (a folder of its own; `moe-record merge` joins it to the others)"
                    + (" (in another format, if this one does not decode)" if r.error_kind == "bad_dump" else "")
                )
            elif run.window and (r.status_code == 413 or (r.status_code or 0) >= 500):
                run.unanswered = True  # the engine kept the window for the next dump (its answer says so)
            return
        if run.run and r.run_id and run.run != r.run_id:
            r.ok, r.error_kind = False, "run_changed"
            r.error = f"recording restarted by another start since this fleet's (run {run.run} -> {r.run_id}): the dump is partial"
            return
        expected, run.window = run.window, (r.window + 1 if r.window is not None else None)
        if run.unanswered and r.window == expected and r.resent:
            r.note = (
                f"window {expected}, whose answer to an earlier dump was lost on the way; what the engine "
                "recorded since is its next window: dump again to collect it"
            )
        run.unanswered = False
        if expected is not None and r.window is not None and r.window != expected:
            r.ok, r.error_kind = False, "window_taken"
            r.error = (
                f"another client's dump (or one of this fleet's whose answer was lost) took part of this run since "
                f"this fleet's {'start' if expected == 1 else 'last dump'} (window {expected} -> {r.window}): "
                "the dump holds only what came after"
            )
        elif run.cut_short or (r.stopped_by is not None and r.stopped_by != self.client_id):
            run.cut_short = run.cut_short or "another client stopped this run's recording"
            r.ok, r.error_kind = False, "stopped_early"
            r.error = f"{run.cut_short}: the dump is partial"

    async def _fan_out(self, action: str, calls: list[_Call]) -> FleetResult:
        """``calls`` (one per engine, ``_calls_for``) sent together; each engine's outcome."""
        t0 = time.perf_counter()
        results: list[EngineResult | None] = [None] * len(calls)
        # Where this fleet's start failed, a stop or dump would end, or take and clear, a
        # recording that is not this run's (another client's): such engines are left as they are.
        for i, e in enumerate(self.engines):
            if action not in ("stop", "dump"):
                continue
            if e in self._same_as:
                kind, why = "duplicate", f"the same engine as {self._same_as[e]}: {action} there"
            elif e in self._runs and self._runs[e] is None:
                kind = "not_started"
                why = (
                    f"this fleet did not start this engine: not {'stopped' if action == 'stop' else 'dumped'}, "
                    "so a recording there that is not this run's is left as it is"
                )
            else:
                continue
            results[i] = EngineResult(e, action, False, error_kind=kind, error=why)
        # Engines on the lean transport go out in one batch, all written before any answer is
        # awaited (Http11Transport.send_all); the others (https, a transport passed in, a
        # concurrency cap) get a task each.
        todo = [i for i, r in enumerate(results) if r is None]
        batch = [i for i in todo if calls[i].prepared is not None and not self.max_concurrency]
        in_batch = set(batch)
        tasks = [
            (i, asyncio.ensure_future(self._call(self.engines[i], action, calls[i]))) for i in todo if i not in in_batch
        ]

        answered: dict[int, Answer] = {}  # the batch's answers as they come: known even if cut short

        def on_answer(j: int, answer: Answer | httpx.HTTPError) -> None:
            # An error, a retry, a large dump may wait: a task of its own, begun at once, so an
            # engine's retry does not wait for the slowest engine's answer.
            i = batch[j]
            if self._final(action, calls[i], answer):
                answered[i] = answer  # type: ignore[assignment]  # _final: an Answer
            else:
                tasks.append((i, asyncio.ensure_future(self._attempts(self.engines[i], action, calls[i], t0, answer))))

        self.cut_short = None
        try:
            if batch:
                answers = await self._lean.send_all([calls[i].prepared for i in batch], on_answer)  # type: ignore[union-attr,misc]
                for i, answer in zip(batch, answers):
                    if self._final(action, calls[i], answer):
                        # Interpreted here, without a task: it never waits (a small answer).
                        t1 = time.perf_counter()
                        r = await _interpret(self.engines[i], action, answer, calls[i].asked)  # type: ignore[arg-type]
                        r.elapsed = answer.received - t0 + time.perf_counter() - t1  # type: ignore[union-attr]
                        results[i] = r
            for (i, _), r in zip(tasks, await asyncio.gather(*(t for _, t in tasks))):
                results[i] = r
        except BaseException:  # cancelled (Ctrl-C through Fleet): say who had answered what
            for _, t in tasks:
                t.cancel()
            await asyncio.gather(*(t for _, t in tasks), return_exceptions=True)
            for i, t in tasks:
                if results[i] is None and t.done() and not t.cancelled() and t.exception() is None:
                    results[i] = t.result()
            for i, answer in answered.items():
                if results[i] is None:
                    results[i] = r = await _interpret(self.engines[i], action, answer, calls[i].asked)
                    r.elapsed = answer.received - t0
            self.cut_short = FleetResult(
                action=action,
                results=[r or _unanswered(e, action) for e, r in zip(self.engines, results)],
                elapsed=time.perf_counter() - t0,
            )
            raise
        return FleetResult(action=action, results=results, elapsed=time.perf_counter() - t0)  # type: ignore[arg-type]

    def _final(self, action: str, call: _Call, answer: Answer | httpx.HTTPError) -> bool:
        """Whether this first answer settles the call without waiting (no retry, no big decode)."""
        if not isinstance(answer, Answer) or len(answer.body) > _INLINE_DECODE:
            return False
        return not (answer.status in _RETRY_STATUS and _safe_to_repeat(action, call) and self.retries > 0)

    async def _call(self, engine: str, action: str, call: _Call) -> EngineResult:
        if not self.max_concurrency:
            return await self._attempts(engine, action, call)
        loop = asyncio.get_running_loop()
        if self._sem is None or self._sem_loop is not loop:
            self._sem, self._sem_loop = asyncio.Semaphore(self.max_concurrency), loop
        async with self._sem:
            return await self._attempts(engine, action, call)

    def _calls_for(
        self,
        action: str,
        params: dict[str, str] | None,
        accept: str,
        timeout: float | None = None,
        per_engine: Mapping[str, Mapping[str, str]] | None = None,
    ) -> list[_Call]:
        """Each engine's request for this kind of call (built at its first use, then reused), with
        ``per_engine`` headers (a dump's ``H_RESEND``) added for this call only. A call's own
        ``timeout`` replaces the one kept for its kind, not adds to it: a poll whose limit is the
        time left in its interval kept one set of requests per value (82 KB a poll of 32 engines,
        never freed)."""
        key = (action, tuple(sorted(params.items())) if params else (), accept, timeout is None)
        limit = self.timeout if timeout is None else timeout
        kept = self._calls.get(key)
        if kept is not None and kept[0] == limit:
            calls = kept[1]
        else:
            calls = []
            self._calls[key] = (limit, calls)
            extensions: dict[str, Any] = {"timeout": httpx.Timeout(limit).as_dict()}
            if action == "dump":
                extensions["max_body"] = self.max_dump_bytes
            else:  # a control answer is small: the time limit holds for all of it (_http.py)
                extensions["deadline"], extensions["max_body"] = limit, _CONTROL_MAX_BODY
            for engine in self.engines:
                headers = {**self._headers, "accept": accept}
                if action == "dump":  # our engines then answer 413 and keep the window, rather than lose it
                    headers[H_MAX_BYTES] = str(self.max_dump_bytes)
                token = self._keys.get(engine)
                if token:
                    headers["authorization"] = f"Bearer {token}"
                request = httpx.Request(
                    "POST", engine + PATHS[action], params=params, headers=headers, extensions=extensions
                )
                lean = self._transports[engine] is self._lean
                calls.append(_Call(request, self._lean.prepare(request) if lean else None))  # type: ignore[union-attr]
        if not per_engine:
            return calls
        return [_with_headers(call, per_engine[e]) if e in per_engine else call for e, call in zip(self.engines, calls)]

    async def _send(self, engine: str, call: _Call) -> Answer:
        """One answer and its whole body (as the transport gave it: no join for one chunk)."""
        if call.prepared is not None:
            return await self._lean.send(call.prepared)  # type: ignore[union-attr]
        deadline = call.request.extensions.get("deadline")
        if deadline is None:
            return await self._send_httpx(engine, call.request)
        try:  # the lean transport keeps the deadline itself; httpx has none
            return await asyncio.wait_for(self._send_httpx(engine, call.request), deadline)
        except asyncio.TimeoutError:  # TimeoutError from 3.11 on
            raise httpx.ReadTimeout("the whole answer did not arrive in time", request=call.request) from None

    async def _send_httpx(self, engine: str, request: httpx.Request) -> Answer:
        resp = await self._transports[engine].handle_async_request(request)
        limit, size, chunks = request.extensions["max_body"], 0, []
        try:
            async for chunk in resp.stream:  # type: ignore[union-attr]
                size += len(chunk)
                check_body_size(size, limit, " so far", request)  # as the lean transport refuses it
                chunks.append(chunk)
        finally:
            await resp.aclose()
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return Answer(resp.status_code, dict(resp.headers.items()), body, time.perf_counter())

    async def _attempts(
        self,
        engine: str,
        action: str,
        call: _Call,
        t0: float | None = None,
        first: Answer | httpx.HTTPError | None = None,
    ) -> EngineResult:
        """The call with its retries; ``first``: the first attempt's outcome, when already sent."""
        t0 = time.perf_counter() if t0 is None else t0
        repeatable = _safe_to_repeat(action, call)
        attempt = 0
        while True:
            attempt += 1
            try:
                if first is None:
                    answer = await self._send(engine, call)
                else:
                    answer, first = first, None  # type: ignore[assignment]
                    if isinstance(answer, httpx.HTTPError):
                        raise answer
            except httpx.HTTPError as e:
                timeout = call.request.extensions["timeout"]["read"]
                kind, message, retry = _transport_failure(e, action, timeout, repeatable)
                if retry and attempt <= self.retries:
                    await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
                    continue
                return EngineResult(
                    engine,
                    action,
                    False,
                    elapsed=time.perf_counter() - t0,
                    attempts=attempt,
                    error=message,
                    error_kind=kind,
                )
            if answer.status in _RETRY_STATUS and repeatable and attempt <= self.retries:
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
                continue
            result = await _interpret(engine, action, answer, call.asked)
            result.elapsed, result.attempts = time.perf_counter() - t0, attempt
            return result


def _with_headers(call: _Call, extra: Mapping[str, str]) -> _Call:
    """``call`` with ``extra`` headers (a dump's ``H_RESEND``). Spliced into the lean transport's
    bytes: building the request anew cost a fan-out ~90 us per engine (tests/perf/bench_http.py)."""
    resends = H_RESEND in extra
    if call.prepared is not None:
        data = call.prepared.data
        assert data.endswith(b"\r\n\r\n"), "a control request has no body"
        lines = b"".join(k.encode() + b": " + v.encode("latin-1") + b"\r\n" for k, v in extra.items())
        return _Call(call.request, call.prepared._replace(data=data[:-2] + lines + b"\r\n"), resends)
    r = call.request
    request = httpx.Request(r.method, r.url, headers={**r.headers, **extra}, extensions=r.extensions)
    return _Call(request, None, resends)


def _safe_to_repeat(action: str, call: _Call) -> bool:
    """Whether a call that may have reached the engine can be sent again: start, stop, status,
    and a dump that names the window it asks for (H_RESEND: an engine that took that window and
    lost its answer sends the same window again)."""
    return action in IDEMPOTENT or call.resends


def _unanswered(engine: str, action: str) -> EngineResult:
    """An engine without an answer when the call was cut short."""
    return EngineResult(
        engine,
        action,
        False,
        error_kind="interrupted",
        error=f"no answer before the interrupt: the {action} may still take effect there (moe-record status tells)",
    )


def _transport_failure(e: httpx.HTTPError, action: str, timeout: float, repeatable: bool) -> tuple[str, str, bool]:
    """(error kind, message, safe to retry) for a request that got no HTTP answer; ``repeatable``:
    the call may be sent again after it reached the engine (``_safe_to_repeat``)."""
    if isinstance(e, BodyTooLarge):
        limit = "max_dump_bytes" if action == "dump" else "a control answer's"
        return "too_large", f"answer refused: {e} ({limit})", False
    if isinstance(e, (httpx.ConnectError, httpx.ConnectTimeout)):
        # The request never reached the engine: retrying is safe for every action.
        return "connect", f"cannot connect: {e or type(e).__name__}", True
    if isinstance(e, httpx.TimeoutException):
        # The engine may still be working on it: repeating would pile up work, or a second dump.
        message = f"no answer within {timeout:g} s ({type(e).__name__})"
        if action == "dump":
            message += (
                "; the engine may have taken the window: ours keep it for this fleet's next dump (and for any "
                "client's when the answer had not begun): dump again, with a longer timeout; it is in their dump "
                "folder where files were asked for"
            )
        return "timeout", message, False
    return "connection", f"connection failed: {type(e).__name__}: {e}", repeatable


async def _interpret(engine: str, action: str, answer: Answer, asked: str | None = None) -> EngineResult:
    """Turn one HTTP answer into an EngineResult (ours, stock SGLang's, or an error).

    ``asked``: the dump format requested; a dump in another is refused (a ``.pt`` is never
    loaded unasked). Whatever the answer holds, it is this engine's result alone: an answer
    nothing can read is a ``protocol`` failure, never an exception out of the fan-out.
    Only a dump over ``_INLINE_DECODE`` bytes waits (its decode runs on a thread).
    """
    try:
        return await _read_answer(engine, action, answer, asked)
    except Exception as e:  # noqa: BLE001 - e.g. RecursionError from JSON nested 100000 deep
        r = EngineResult(engine, action, False, status_code=answer.status)
        r.error_kind, r.error = "protocol", f"the answer could not be read: {type(e).__name__}: {str(e)[:200]}"
        return r


async def _read_answer(engine: str, action: str, answer: Answer, asked: str | None) -> EngineResult:
    status, headers, body = answer.status, answer.headers, answer.body
    r = EngineResult(engine, action, False, status_code=status)
    r.instance_id, r.run_id, r.window = headers.get(H_INSTANCE), headers.get(H_RUN), _int(headers.get(H_WINDOW))
    r.stopped_by, r.resent = headers.get(H_STOPPED_BY), headers.get(H_RESENT) == "true"
    timing = headers.get("server-timing")
    if timing:
        r.server_timing = _server_timing(timing)
    ctype = headers.get("content-type", "").split(";")[0].strip().lower()
    if status != 200:
        r.error_kind = "too_large" if status == 413 and action == "dump" else "http"
        r.error = f"HTTP {status}: {_error_message(answer, ctype)}"
        if headers.get(H_FILES):  # a dump that failed after its window went into files: there it is
            r.files, r.location = _json_list(headers[H_FILES]), ON_SERVER
        if status == 404 and action == "status":
            r.error += " (no status endpoint: a stock SGLang server has none, or the endpoints are off)"
        elif status == 404:
            r.error += " (endpoints absent: not enabled on this engine?)"
        return r
    fmt = headers.get(H_FORMAT)
    if action == "dump" and (fmt or ctype in (MSGPACK, DUMP_JSON)):
        from ..schema import decode  # torch: loaded by the first dump, not by start, stop or status

        r.flavor, r.location = "moe-record", IN_RESPONSE
        fmt = fmt or ("msgpack" if ctype == MSGPACK else "json")
        if fmt != asked:
            r.error_kind, r.error = "protocol", f"the engine answered a dump in {fmt[:40]!r} where {asked!r} was asked"
            return r
        try:
            # Large dumps decode on a worker thread; a small one costs less than the thread hop.
            if len(body) > _INLINE_DECODE:
                r.dump = await asyncio.to_thread(decode, body, fmt, engine)
            else:
                r.dump = decode(body, fmt, engine)
        except Exception as e:  # noqa: BLE001 - MoeRecordError, or even a bug: this engine's failure alone
            why = str(e) if isinstance(e, MoeRecordError) else f"{type(e).__name__}: {e}"
            r.error_kind, r.error = "bad_dump", f"the dump in the answer does not decode: {why}"
            return r
        if headers.get(H_FILES):
            r.files = _json_list(headers[H_FILES])
        r.ok = True
        return r
    if ctype == "application/json":
        try:
            info = json.loads(body)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError included
            r.error_kind, r.error = "protocol", f"answer says JSON but does not parse: {e}"
            return r
        if not isinstance(info, dict):
            r.error_kind, r.error = "protocol", f"expected a JSON object, got {type(info).__name__}"
            return r
        r.flavor, r.info = "moe-record", info
        r.instance_id = info.get("instance_id") or r.instance_id
        r.run_id = info.get("run_id") or r.run_id
        r.window = _int(info.get("window")) or r.window
        r.stopped_by = info.get("stopped_by") if isinstance(info.get("stopped_by"), str) else r.stopped_by
        if action == "dump":
            r.location, r.files = ON_SERVER, [str(f) for f in info.get("files") or []]
        r.ok = bool(info.get("ok", True))
        if not r.ok:
            r.error_kind, r.error = "http", _error_message(answer, ctype)
        return r
    text = _text(answer, body)
    if action in TEXTS and text.strip() == TEXTS[action].strip():
        r.flavor, r.ok = "sglang", True
        if action == "dump":
            r.location, r.note = ON_SERVER, "dump written " + _SGLANG_DIR_HINT
        return r
    r.error_kind, r.error = "protocol", f"unexpected answer ({ctype or 'no content-type'}): {text[:200]!r}"
    return r


def _text(answer: Answer, body: bytes | bytearray) -> str:
    """``body`` (the answer's, or a part) as text, in the charset its content type names."""
    charset = "utf-8"
    for param in answer.headers.get("content-type", "").split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            charset = value.strip().strip('"') or charset
    try:
        return bytes(body).decode(charset, errors="replace")
    except LookupError:  # a charset Python does not know
        return bytes(body).decode("utf-8", errors="replace")


def _error_message(answer: Answer, ctype: str) -> str:
    body = answer.body
    if ctype == "application/json":
        try:
            doc = json.loads(body)
            err = doc.get("error") if isinstance(doc, dict) else None
            if isinstance(err, dict) and err.get("message"):
                return f"{err.get('code', 'error')}: {err['message']}"
            if isinstance(doc, dict) and doc.get("detail"):  # FastAPI's shape
                return str(doc["detail"])
        except (ValueError, RecursionError):
            pass
    # One line, whatever the server sent (an HTML error page from a proxy, say): tags dropped.
    text = " ".join(re.sub(r"<[^>]*>", " ", _text(answer, body[:4096])).split())
    return text[:300] or httpx.codes.get_reason_phrase(answer.status)


def _server_timing(raw: str) -> dict[str, float]:
    """``dump;dur=12.5, encode;dur=3`` -> ``{"dump": 12.5, "encode": 3.0}`` (malformed parts skipped)."""
    out = {}
    for part in raw.split(","):
        name, _, params = part.partition(";")
        for p in params.split(";"):
            p = p.strip()
            if p.startswith("dur="):
                with contextlib.suppress(ValueError):
                    out[name.strip()] = float(p[4:])
    return out


def _int(raw: Any) -> int | None:
    """A window number from a header or a JSON answer (None when absent or malformed)."""
    try:
        return int(raw) if raw is not None else None
    except (TypeError, ValueError):
        return None


def _json_list(raw: str) -> list[str]:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return [raw]
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def merge_engines(dumps: list[Dump], sources: list[str] | None = None) -> Dump:
    """One dump from several engines' dumps. Engines serve different requests, so their counts
    are summed (each engine's dump already merges its own ranks: a run by itself for
    ``merge_dumps``); incompatible models raise ``MergeError`` naming the difference. One dump
    that is one rank of several (a side server, one API server of a DP deployment) is checked
    like any merge: alone, it passed as the whole run's though other token shards were missing."""
    if len(dumps) == 1 and dumps[0].topology.world_size <= 1:
        return dumps[0]
    from ..merge import merge_dumps

    return merge_dumps(dumps, sources=sources)


class Fleet:
    """The synchronous face of :class:`AsyncFleet`: same parameters, same results.

    It runs its own event loop, so it cannot be used from inside a running one (a coroutine,
    a Jupyter cell with a loop): use ``AsyncFleet`` there.

    Example
    -------
    >>> with Fleet(["127.0.0.1:30000", "127.0.0.1:30001"]) as fleet:  # doctest: +SKIP
    ...     fleet.start().raise_for_errors()
    ...     ...  # traffic
    ...     fleet.stop()
    ...     result = fleet.dump()
    >>> result.save("dumps/")  # doctest: +SKIP
    """

    def __init__(self, engines: Sequence[str] | str, **options: Any) -> None:
        self._fleet = AsyncFleet(engines, **options)
        # Made at the first call, so a Fleet that never ran holds no loop to leak.
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def engines(self) -> list[str]:
        return self._fleet.engines

    @property
    def cut_short(self) -> FleetResult | None:
        """See :attr:`AsyncFleet.cut_short`."""
        return self._fleet.cut_short

    @property
    def client_id(self) -> str:
        """See :attr:`AsyncFleet.client_id`."""
        return self._fleet.client_id

    def cut_into(self, status: EngineResult) -> str | None:
        """See :meth:`AsyncFleet.cut_into`."""
        return self._fleet.cut_into(status)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
            task = self._loop.create_task(coro)
            try:
                return self._loop.run_until_complete(task)
            except KeyboardInterrupt:
                # Cancel the call and let it end here: it closes its connections and notes who
                # had answered (cut_short), instead of tasks left pending in a loop about to close.
                task.cancel()
                with contextlib.suppress(BaseException):
                    self._loop.run_until_complete(task)
                raise
        coro.close()
        raise RuntimeError(
            "Fleet is synchronous and cannot run inside a running event loop; use AsyncFleet and await it"
        )

    def start(self, mode: str | None = None) -> FleetResult:
        """See :meth:`AsyncFleet.start`."""
        return self._run(self._fleet.start(mode))

    def stop(self) -> FleetResult:
        """See :meth:`AsyncFleet.stop`."""
        return self._run(self._fleet.stop())

    def status(self, *, timeout: float | None = None) -> FleetResult:
        """See :meth:`AsyncFleet.status`."""
        return self._run(self._fleet.status(timeout=timeout))

    def dump(self, **options: Any) -> FleetResult:
        """See :meth:`AsyncFleet.dump`."""
        return self._run(self._fleet.dump(**options))

    def close(self) -> None:
        """Close the connections and the loop (idempotent)."""
        if self._loop is None or self._loop.is_closed():
            return  # never ran: the client opened no connection
        self._run(self._fleet.aclose())
        self._loop.close()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _memory_size() -> int:
    """This machine's physical memory in bytes (64 GiB where the platform does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # Windows has no sysconf
        return 64 << 30
