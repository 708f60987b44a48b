"""The wire names of the endpoints (``spec/http-api.md``), shared by the server and the client."""

from __future__ import annotations

START_PATH = "/start_expert_distribution_record"
STOP_PATH = "/stop_expert_distribution_record"
DUMP_PATH = "/dump_expert_distribution_record"
STATUS_PATH = "/expert_distribution_record_status"
PATHS = {"start": START_PATH, "stop": STOP_PATH, "dump": DUMP_PATH, "status": STATUS_PATH}

#: SGLang 0.5.23's answers (``sglang/srt/entrypoints/http_server.py``), byte for byte.
START_TEXT = "Start recording the expert distribution.\n"
STOP_TEXT = "Stop recording the expert distribution.\n"
DUMP_TEXT = "Dump expert distribution record.\n"
TEXTS = {"start": START_TEXT, "stop": STOP_TEXT, "dump": DUMP_TEXT}

#: Media types of a dump in a response body, by format.
MSGPACK = "application/x-msgpack"
DUMP_JSON = "application/vnd.moe-record.dump+json"
PT = "application/octet-stream"
MEDIA_TYPES = {"msgpack": MSGPACK, "json": DUMP_JSON, "pt": PT}

#: Response headers (lower-case). Every control answer, errors included, carries the instance
#: id, and the run id once recording was started.
H_INSTANCE = "x-moe-record-instance"
H_RUN = "x-moe-record-run"
H_WINDOW = "x-moe-record-window"  # with the run id: which window of the run (a dump's: the one it delivers)
H_FORMAT = "x-moe-record-format"  # a dump in the body: its format
H_FILES = "x-moe-record-files"  # files written by this dump: a JSON list of paths on the server
H_DUMP_DIR = "x-moe-record-dump-dir"  # the server's dump directory, percent-encoded
H_RANKS = "x-moe-record-ranks"  # how many ranks the dump in the body merges
H_STOPPED_BY = "x-moe-record-stopped-by"  # once the run was stopped: the client that stopped it (H_CLIENT), or "*"
#: Request header: the client's own id (``check_client_id``), the same for all its requests of a
#: run (retries too). Answers name the client of the stop that ended the run, so a client tells
#: its own stop from another client's; a dump's window is sent again only to its client (H_RESEND).
H_CLIENT = "x-moe-record-client"
CLIENT_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-")


def check_client_id(value: str) -> str:
    """``value`` as a client id (``H_CLIENT``): trimmed, 1-128 of ``CLIENT_ID_CHARS``; else ``ValueError``."""
    client = value.strip()
    if not 0 < len(client) <= 128 or not CLIENT_ID_CHARS.issuperset(client):
        raise ValueError(
            f"{H_CLIENT}: expected 1-128 of A-Z a-z 0-9 . _ : -, got {len(client)} characters: {client[:40]!r}"
        )
    return client


#: ``H_STOPPED_BY`` for a stop that named no client.
ANONYMOUS = "*"
#: Request header of a dump: a window number the client asks for again, its answer having not
#: arrived. The engine keeps the last window it answered, with the client it answered (H_CLIENT),
#: until the next dump takes one or a start: the same client naming that window gets it again,
#: and otherwise the header changes nothing (the dump takes the current window).
H_RESEND = "x-moe-record-resend"
H_RESENT = "x-moe-record-resent"  # on a dump's answer: "true" when it is a window sent again (H_RESEND)
#: Request header: the largest dump answer the client takes, bytes. A larger one is answered
#: 413 and the window kept, rather than sent to a client that would hang up on it.
H_MAX_BYTES = "x-moe-record-max-bytes"

#: Values of the dump's ``return`` option.
RETURNS = ("file", "bytes", "both")


def bearer_token_problem(token: str) -> str | None:
    """Why ``token`` cannot be a bearer token (None when it can): an HTTP header carries visible
    ASCII, and RFC 6750's token68 no blanks. A configured key outside that never matched (the
    client could not send it; the server read its bytes as latin-1). The token is never echoed."""
    if not token:
        return "it is empty"
    if not all("!" <= c <= "~" for c in token):
        return "it holds a character a bearer token cannot have (visible ASCII only, no spaces)"
    return None
