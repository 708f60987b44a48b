"""The endpoints as one framework-free request handler: routes, auth, negotiation, errors.

``ControlHandler.handle(method, path, query, headers, body)`` returns a :class:`Response`
(status, headers, body). The ASGI app (``app.py``) calls it; so can any framework: the vLLM
adapter calls it from a FastAPI route. The wire contract is ``spec/http-api.md``.

SGLang's three paths answer exactly as SGLang does by default (200 and one line of plain
text), so stock clients keep working; the extensions are opt-in per request:

* ``Accept: application/json``: a JSON answer with the engine's identity and run id;
* ``Accept: application/x-msgpack`` on a dump, or ``?return=bytes&format=msgpack|json|pt``:
  the dump itself in the body (ranks merged), instead of (``return=bytes``) or as well as
  (``return=both``) SGLang's file;
* ``?mode=`` or a JSON body ``{"mode": ...}`` on start;
* ``/expert_distribution_record_status``.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, quote

from ..env import DEFAULT_MAX_BODY
from ..errors import MoeRecordError, RecorderError
from ..schema import FORMATS, Dump, encode
from .control import Backend, ControlError, Controller, DumpOutcome
from .protocol import (
    DUMP_JSON,
    DUMP_PATH,
    DUMP_TEXT,
    H_CLIENT,
    H_DUMP_DIR,
    H_FILES,
    H_FORMAT,
    H_INSTANCE,
    H_MAX_BYTES,
    H_RANKS,
    H_RESEND,
    H_RESENT,
    H_RUN,
    H_STOPPED_BY,
    H_WINDOW,
    MEDIA_TYPES,
    MSGPACK,
    RETURNS,
    START_PATH,
    START_TEXT,
    STATUS_PATH,
    STOP_PATH,
    STOP_TEXT,
    check_client_id,
)

log = logging.getLogger(__name__)


#: (run id, window number, stopped by): the window of a run an answer is about.
Window = tuple[str | None, int | None, str | None]


class Response(NamedTuple):
    """An HTTP answer: status code, headers (lower-case names), body.

    ``undelivered``: for a dump's answer, what the server calls when it could not deliver it
    (the client went away): it gives the window back to the engine for the next dump, since the
    engine cleared its own copy when it dumped.
    """

    status: int
    headers: dict[str, str]
    body: bytes
    undelivered: Callable[[], None] | None = None

    def json(self) -> Any:
        return json.loads(self.body)


class Route(NamedTuple):
    path: str
    action: str
    methods: tuple[str, ...]


#: The endpoints: SGLang's three, GET and POST as SGLang registers them, then ours.
ROUTES: tuple[Route, ...] = (
    Route(START_PATH, "start", ("GET", "POST")),
    Route(STOP_PATH, "stop", ("GET", "POST")),
    Route(DUMP_PATH, "dump", ("GET", "POST")),
    Route(STATUS_PATH, "status", ("GET", "POST")),
)
_BY_PATH = {r.path: r for r in ROUTES}

#: Dumps whose tensors hold at most this many bytes are encoded on the event loop (JSON, the
#: slowest format, takes well under a millisecond for them); larger ones on a worker thread.
_INLINE_ENCODE = 256 << 10

_OPTIONS = {"start": {"mode"}, "stop": set(), "dump": {"return", "format"}, "status": set()}


def _headers(raw: Mapping[str, str] | Iterable[tuple[Any, Any]] | None) -> dict[str, str]:
    """Lower-case str headers from a mapping or ASGI's list of byte pairs."""
    if raw is None:
        return {}
    items = raw.items() if isinstance(raw, Mapping) else raw
    out: dict[str, str] = {}
    for k, v in items:
        k = k.decode("latin-1") if isinstance(k, bytes) else str(k)
        v = v.decode("latin-1") if isinstance(v, bytes) else str(v)
        k = k.lower()
        out[k] = f"{out[k]}, {v}" if k in out else v
    return out


def _number(h: dict[str, str], name: str, what: str) -> int | None:
    """A header's whole number (None when absent), refused with a 400 when malformed."""
    raw = h.get(name, "").strip()
    if not raw:
        return None
    if not (raw.isdecimal() and len(raw) <= 20):
        raise ControlError(400, "bad_header", f"{name}: expected {what}, got {raw[:40]!r}")
    return int(raw)


def _client(h: dict[str, str]) -> str | None:
    """The client's id (``H_CLIENT``), checked: it is echoed to every client."""
    raw = h.get(H_CLIENT)
    if raw is None:
        return None
    try:
        return check_client_id(raw)
    except ValueError as e:
        raise ControlError(400, "bad_header", str(e)) from None


def _query(raw: str | bytes | Mapping[str, str] | None) -> dict[str, str]:
    if raw is None:
        return {}
    if isinstance(raw, Mapping):
        return {str(k): str(v) for k, v in raw.items()}
    if isinstance(raw, bytes):
        raw = raw.decode("latin-1")
    return _unique(parse_qsl(raw, keep_blank_values=True), "bad_option", "{name}: given twice in the query")


def _unique(pairs: Iterable[tuple[str, Any]], code: str, twice: str) -> dict[str, Any]:
    """``pairs`` as a dict, refusing a name given twice (the query's, a JSON body's): which one was
    meant? The last one silently winning would hide a client's bug. ``twice`` names it."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ControlError(400, code, f"{twice.format(name=k)} ({out[k]!r}, {v!r})")
        out[k] = v
    return out


def check_bearer(headers: Mapping[str, str], api_key: str | Sequence[str] | None) -> ControlError | None:
    """None when the request may pass: no key configured, or ``Authorization: Bearer <key>``
    (any one of the keys, where several are: vLLM takes several ``--api-key`` values).

    The scheme is matched case-insensitively (RFC 7235: ``bearer`` works too), the token in
    constant time (``hmac.compare_digest``). ``headers`` must have lower-case names.
    """
    if not api_key:
        return None
    got = headers.get("authorization", "")
    # RFC 7235: the scheme, one or more spaces, the token; a field value has no surrounding blanks.
    scheme, _, token = got.strip().partition(" ")
    token = token.lstrip(" ")
    keys = [api_key] if isinstance(api_key, str) else api_key
    # The header's bytes (decoded as latin-1 on the way in) against the key's UTF-8: a non-ASCII
    # key an engine was given (vLLM's --api-key) matches a client sending it as UTF-8.
    sent = token.encode("latin-1", "replace")
    if scheme.lower() == "bearer" and any(hmac.compare_digest(sent, k.encode()) for k in keys):
        return None
    what = "missing" if not got else "wrong"
    return ControlError(401, "unauthorized", f"{what} bearer token", {"www-authenticate": "Bearer"})


def check_browser(headers: Mapping[str, str], local_only: bool = False) -> ControlError | None:
    """None when the request may pass; 403 for a browser's request from another site.

    Why: the endpoints take GET (SGLang's clients use it) and change state; a web page could
    make a browser start (and so discard) a recording with an ``<img src=...>``. Browsers say
    where a request comes from (``Sec-Fetch-Site``, ``Origin``); curl, httpx, SGLang's clients
    and the Fleet send neither. ``local_only`` (the server listens on loopback only): a ``Host``
    naming anything but this machine is a DNS-rebinding page's, refused too.
    """
    site = headers.get("sec-fetch-site", "").lower()
    origin = headers.get("origin")
    host = headers.get("host", "")
    if site in ("cross-site", "same-site") or (
        origin is not None and origin.partition("://")[2].rstrip("/").lower() != host.lower()
    ):
        return ControlError(403, "cross_site", "a browser request from another site: the endpoints take none")
    if local_only and host and not _loopback(host):  # a browser always sends Host; an HTTP/1.0 tool may not
        return ControlError(403, "bad_host", f"Host {host[:100]!r}: this server answers only to loopback names")
    return None


def _loopback(host: str) -> bool:
    """Whether a Host header names this machine (``localhost``, a loopback address), any port."""
    name = host.rpartition("]")[0][1:] if host.startswith("[") else host.rpartition(":")[0] or host
    if name.lower() == "localhost" or name.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class ControlHandler:
    """The endpoints over a backend, callable from any web framework.

    Parameters
    ----------
    backend:
        A :class:`~moe_record_sdk.server.control.Backend` (e.g. ``LocalBackend(recorder)``) or a
        ready :class:`Controller`.
    dump_dir:
        The only directory dump files are written to (``moe_record_sdk.env.dump_dir()`` reads
        SGLang's variable). Ignored when ``backend`` is a Controller.
    api_key:
        When set, every request needs ``Authorization: Bearer <api_key>`` (401 otherwise); a
        list: any one of its keys.
    enabled:
        False makes every endpoint absent (404), as if not installed.
    max_body:
        Largest request body accepted, bytes (413 above).
    engine:
        Engine name reported in JSON answers.
    local_only:
        The server listens on loopback only: requests whose ``Host`` names another machine are
        refused (403), as a DNS-rebinding web page's would. Browsers' cross-site requests are
        refused in any case (:func:`check_browser`).

    Example
    -------
    >>> handler = ControlHandler(LocalBackend(Recorder(2, 8, 2)), dump_dir="/tmp")  # doctest: +SKIP
    >>> resp = await handler.handle("POST", "/start_expert_distribution_record", "", {}, b"")  # doctest: +SKIP
    >>> resp.status, resp.body  # doctest: +SKIP
    (200, b'Start recording the expert distribution.\\n')
    """

    routes = ROUTES

    def __init__(
        self,
        backend: Backend | Controller,
        *,
        dump_dir: str | None = None,
        api_key: str | Sequence[str] | None = None,
        enabled: bool = True,
        max_body: int = DEFAULT_MAX_BODY,
        engine: str = "torch",
        local_only: bool = False,
    ) -> None:
        if isinstance(backend, Controller):
            self.controller = backend
        else:
            if dump_dir is None:
                raise ValueError("dump_dir: required with a backend (moe_record_sdk.env.dump_dir() gives SGLang's)")
            self.controller = Controller(backend, dump_dir=dump_dir, engine=engine)
        self.api_key = api_key or None
        self.enabled = enabled
        self.max_body = max_body
        self.local_only = local_only

    # -- routing ------------------------------------------------------------------------------
    def owns(self, path: str) -> bool:
        """Whether ``path`` is one of the endpoints (and they are enabled)."""
        return self.enabled and path in _BY_PATH

    def precheck(
        self, method: str, path: str, headers: Any = None, content_length: int | None = None
    ) -> Response | None:
        """The answer due before the body is read (404, 401, 405, 413), or None to go on."""
        h = _headers(headers)
        route = _BY_PATH.get(path) if self.enabled else None
        if route is None:
            return self.error(ControlError(404, "not_found", f"no endpoint {path}"), h)
        denied = self.refused(h)
        if denied:
            return self.error(denied, h)
        if method.upper() not in route.methods:
            allow = ", ".join(route.methods)
            return self.error(
                ControlError(405, "method_not_allowed", f"{method} {path}: use {allow}", {"allow": allow}), h
            )
        if content_length is None and h.get("content-length", "").isdigit():
            content_length = int(h["content-length"])
        if content_length is not None and content_length > self.max_body:
            return self.error(self._too_large(), h)
        return None

    def refused(self, h: dict[str, str]) -> ControlError | None:
        """Why a request may not be served (a browser's from another site, a wrong Host, a
        missing or wrong token), or None: every route's check, before its method or body."""
        return check_browser(h, self.local_only) or check_bearer(h, self.api_key)

    def _too_large(self) -> ControlError:
        return ControlError(
            413, "body_too_large", f"request body over {self.max_body} bytes; control requests need none"
        )

    async def handle(
        self,
        method: str,
        path: str,
        query: str | bytes | Mapping[str, str] | None,
        headers: Mapping[str, str] | Iterable[tuple[Any, Any]] | None,
        body: bytes = b"",
    ) -> Response:
        """Serve one request; never raises for a bad request (4xx) or an engine failure (5xx)."""
        h = _headers(headers)
        early = self.precheck(method, path, h, len(body))
        if early is not None:
            return early
        return await self.serve(method, path, query, h, body)

    async def serve(
        self, method: str, path: str, query: str | bytes | Mapping[str, str] | None, h: dict[str, str], body: bytes
    ) -> Response:
        """``handle`` for a request that passed ``precheck`` (body included), headers normalized.

        Why: the ASGI app prechecks before it reads the body; checking and normalizing again
        would repeat that work on every request.
        """
        action = _BY_PATH[path].action
        try:
            client = _client(h)  # a malformed one is refused by every action, before a start takes effect
            options = self._options(action, _query(query), body, h)
            if action == "start":
                return await self._start(options, h)
            if action == "stop":
                already = await self.controller.stop(client)
                return self._answer(h, "stop", STOP_TEXT, recording=False, already_stopped=already)
            if action == "dump":
                return await self._dump(options, h, client)
            return await self._status(h)
        except ControlError as e:
            return self.error(e, h)
        except (RecorderError, MoeRecordError) as e:
            return self.error(ControlError(400, "bad_request", str(e)), h)
        except Exception as e:  # an engine failure must answer, not drop the connection
            log.exception("%s %s failed", method, path)
            return self.error(ControlError(500, "engine_error", f"{type(e).__name__}: {e}"), h)

    # -- requests -----------------------------------------------------------------------------
    def _options(self, action: str, query: dict[str, str], body: bytes, h: dict[str, str]) -> dict[str, str]:
        """Query parameters, overridden by a JSON object body; unknown names are refused."""
        options = dict(query)
        if body.strip():
            try:
                obj = json.loads(
                    body, object_pairs_hook=lambda pairs: _unique(pairs, "bad_body", "body.{name}: given twice")
                )
            except ControlError:
                raise
            except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
                raise ControlError(400, "bad_body", f"body: not JSON ({e}); send none, or a JSON object") from None
            if not isinstance(obj, dict):
                raise ControlError(400, "bad_body", f"body: expected a JSON object, got {type(obj).__name__}")
            for k, v in obj.items():
                if v is not None and not isinstance(v, str):
                    raise ControlError(400, "bad_body", f"body.{k}: expected a string, got {type(v).__name__}")
                if v in (None, ""):  # as if not given: the query's value, if any, stands
                    options.setdefault(k, v)
                else:
                    options[k] = v
        unknown = sorted(set(options) - _OPTIONS[action])
        if unknown:
            allowed = ", ".join(sorted(_OPTIONS[action])) or "none"
            raise ControlError(
                400, "unknown_option", f"{', '.join(unknown)}: not an option of {action} (options: {allowed})"
            )
        return {k: v for k, v in options.items() if v not in (None, "")}  # empty: as if not given

    async def _start(self, options: dict[str, str], h: dict[str, str]) -> Response:
        mode = options.get("mode")
        await self.controller.start(mode)
        # The mode asked for; without one, each rank keeps its own (a status call would tell).
        return self._answer(h, "start", START_TEXT, recording=True, **({"mode": mode} if mode else {}))

    def _answer(
        self, h: dict[str, str], action: str, text: str, window: Window | None = None, **extra: Any
    ) -> Response:
        """``window``: the (run, window) the answer is about, where not the current one (a dump's)."""
        # No status round trip here: on a multi-rank engine each one costs a call to every rank.
        if not _accepts_json(h):
            return self._text(200, text, window)
        identity = self.controller.identity()
        if window is not None:
            identity["run_id"], identity["window"], identity["stopped_by"] = window
        doc = {"ok": True, "action": action, "message": text.strip(), **identity, **extra}
        return self._json(200, doc, window)

    async def _dump(self, options: dict[str, str], h: dict[str, str], client: str | None) -> Response:
        ret, fmt = options.get("return"), options.get("format")
        if ret is not None and ret not in RETURNS:
            raise ControlError(400, "bad_option", f"return: {ret!r} is not one of {', '.join(RETURNS)}")
        if fmt is not None and fmt not in FORMATS:
            raise ControlError(400, "bad_option", f"format: {fmt!r} is not one of {', '.join(FORMATS)}")
        limit = _number(h, H_MAX_BYTES, "a number of bytes")
        resend = _number(h, H_RESEND, "a window number")
        asked = _dump_format_accepted(h)
        if ret is None:
            ret = "bytes" if (fmt or asked) else "file"
        fmt = fmt or asked or "msgpack"
        t0 = time.perf_counter()
        outcome = await self.controller.dump(write_files=ret != "bytes", client=client, resend=resend)
        resent = outcome.resent  # read at once: it describes this request
        # The window is taken: from here a failure keeps it for the next dump (or names its files).
        try:
            resp = await self._deliver(outcome, ret, fmt, limit, h, t0)
            if resent:
                resp.headers[H_RESENT] = "true"
            self.controller.sent(outcome, client)
            return resp
        except ControlError as e:
            if outcome.files:  # the files hold the window: say which, as a dump's answer does
                e.headers[H_FILES] = json.dumps(outcome.files)
            raise
        except Exception as e:  # noqa: BLE001 - even a bug must not lose the window
            log.exception("dump: the answer could not be made")
            where = self._kept(outcome)
            raise ControlError(500, "engine_error", f"{type(e).__name__}: {e}; {where}") from None

    async def _deliver(
        self, outcome: DumpOutcome, ret: str, fmt: str, limit: int | None, h: dict[str, str], t0: float
    ) -> Response:
        """The answer for a window just taken (``_dump``)."""
        t1 = time.perf_counter()
        ctl = self.controller
        files = list(outcome.files)
        window = (outcome.run_id, outcome.window, outcome.stopped_by)
        if ret == "file":
            return self._answer(
                h, "dump", DUMP_TEXT, files=files, dump_dir=ctl.dump_dir, mode=outcome.merged.mode,
                num_passes=outcome.merged.window.num_passes, num_ranks=len(outcome.dumps), window=window,
            )  # fmt: skip
        try:
            if _tensor_bytes(outcome.merged) > _INLINE_ENCODE:
                data = await asyncio.to_thread(encode, outcome.merged, fmt)
            else:  # a small dump encodes in less time than the hop to a worker thread costs
                data = encode(outcome.merged, fmt)
        except Exception as e:  # noqa: BLE001 - e.g. a count past int32 in SGLang's .pt: the window is taken
            where = self._kept(outcome, "dump again (msgpack and json hold any count)")
            raise ControlError(500, "dump_encode_failed", f"cannot encode the dump as {fmt}: {e}; {where}") from None
        if limit is not None and len(data) > limit:
            where = self._kept(outcome, "dump again with a larger limit, or as files (return=file)")
            raise ControlError(
                413,
                "too_large",
                f"the dump is {len(data)} bytes, over the {limit} this client takes ({H_MAX_BYTES}); {where}",
            )
        t2 = time.perf_counter()
        headers = {
            "content-type": MEDIA_TYPES[fmt],
            # W3C Server-Timing: where the engine spent the time (reading the recorders, encoding).
            "server-timing": f"dump;dur={(t1 - t0) * 1000:.1f}, encode;dur={(t2 - t1) * 1000:.1f}",
            H_FORMAT: fmt,
            H_RANKS: str(len(outcome.dumps)),
            H_DUMP_DIR: quote(ctl.dump_dir),  # percent-encoded: header values are latin-1
        }
        if files:
            headers[H_FILES] = json.dumps(files)
        undelivered = None if files else lambda: self._kept(outcome)
        return self._finish(Response(200, headers, data, undelivered), window)

    def _kept(self, outcome: DumpOutcome, then: str = "") -> str:
        """A collected window whose answer cannot go out: kept for the next dump, unless it was
        written as files too (return=both), which then hold it (kept, it would be delivered twice)."""
        if outcome.files:
            return f"the dump is in {', '.join(outcome.files)}"
        self.controller.keep(outcome)
        return "the recording is kept" + (f": {then}" if then else "")

    async def _status(self, h: dict[str, str]) -> Response:
        ranks = await self.controller.status()
        doc = {
            "ok": True,
            "action": "status",
            **self.controller.identity(),
            "enabled": True,
            "recording": any(r.get("recording") for r in ranks),
            "dump_dir": self.controller.dump_dir,
            "auth": self.api_key is not None,
            "ranks": ranks,
        }
        return self._json(200, doc)

    # -- answers ------------------------------------------------------------------------------
    def _finish(self, resp: Response, window: Window | None = None) -> Response:
        """Headers every answer carries; ``window``: as in ``_answer``."""
        ctl = self.controller
        if self.enabled:  # disabled, "as if not installed": no answer names this instance or its run
            resp.headers[H_INSTANCE] = ctl.instance_id
            run, number, stopped_by = window or (ctl.run_id, ctl.window, ctl.stopped_by)
            if run:
                resp.headers[H_RUN] = run
                if number is not None:
                    resp.headers[H_WINDOW] = str(number)
                if stopped_by is not None:
                    resp.headers[H_STOPPED_BY] = stopped_by
        resp.headers["content-length"] = str(len(resp.body))
        return resp

    def _text(self, status: int, text: str, window: Window | None = None) -> Response:
        return self._finish(Response(status, {"content-type": "text/plain; charset=utf-8"}, text.encode()), window)

    def _json(self, status: int, doc: Any, window: Window | None = None) -> Response:
        return self._finish(Response(status, {"content-type": "application/json"}, json.dumps(doc).encode()), window)

    def error(self, e: ControlError, headers: Mapping[str, str] | None = None) -> Response:
        """The answer for an error: JSON for clients that take JSON or dump bytes, else a line."""
        h = headers or {}
        if _accepts_json(h) or _dump_format_accepted(h):
            resp = self._json(
                e.status, {"ok": False, "error": {"status": e.status, "code": e.code, "message": e.message}}
            )
        else:  # one line, as the spec says: a name the client sent may hold a newline (%0A)
            line = " ".join(e.message.splitlines())
            resp = self._text(e.status, f"{line}\n")
        resp.headers.update(e.headers)
        if e.status == 401 or (e.status == 404 and self.api_key is not None):
            # A caller without the key (or one probing paths) learns nothing of this engine:
            # not its identity, not its run.
            for name in (H_INSTANCE, H_RUN, H_WINDOW, H_STOPPED_BY):
                resp.headers.pop(name, None)
        return resp

    def too_large(self, headers: Any = None) -> Response:
        """The 413 answer, for servers that find the body too large while reading it."""
        return self.error(self._too_large(), _headers(headers))


def _tensor_bytes(dump: Dump) -> int:
    """The bytes a dump's tensors hold: what its encoding costs grows with."""
    tensors = [dump.logical_count, dump.total_logical_count, dump.physical_count, dump.physical_to_logical_map]
    tensors += [r.topk_ids_of_layer for r in dump.records]
    return sum(t.nbytes for t in tensors if t is not None)


_QVALUE = re.compile(r"0(\.[0-9]{0,3})?|1(\.0{0,3})?")


def _accepted(h: Mapping[str, str]) -> set[str]:
    """The media types ``Accept`` names with q > 0. Wildcards (curl's ``*/*``) name none, so they
    keep SGLang's text answers."""
    out = set()
    for item in h.get("accept", "").split(","):
        media, *params = item.split(";")
        q = 1.0
        for param in params:
            name, _, value = param.strip().partition("=")
            if name.strip().lower() == "q":
                # RFC 9110's qvalue, 0 to 1 with at most three decimals; a malformed weight
                # (1.5, inf, 1e0) selects nothing rather than guessing.
                q = float(value) if _QVALUE.fullmatch(value.strip()) else 0.0
        if q > 0:
            out.add(media.strip().lower())
    return out


def _accepts_json(h: Mapping[str, str]) -> bool:
    return "application/json" in _accepted(h)


def _dump_format_accepted(h: Mapping[str, str]) -> str | None:
    """The dump format ``Accept`` names by its media type: msgpack first, then the dump's JSON."""
    accepted = _accepted(h)
    if not accepted.isdisjoint((MSGPACK, "application/msgpack")):
        return "msgpack"
    return "json" if DUMP_JSON in accepted else None
