"""Reading and writing dumps: format detection, msgpack/JSON codecs, atomic saves."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import secrets
import stat
from typing import Any

import msgspec
import torch

from ..errors import DumpFormatError, SchemaVersionError
from .dump import Dump, DumpAny
from .names import FORMATS, SCHEMA_VERSION
from .sglang import load_legacy_csv, load_sglang_pt, to_sglang_dict
from .tensors import tensor_from_wire, tensor_to_wire

_SUFFIXES = {".pt": "pt", ".pth": "pt", ".msgpack": "msgpack", ".mpk": "msgpack", ".json": "json"}


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return tensor_to_wire(obj)
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


def _dec_hook(typ: type, obj: Any) -> Any:
    if typ is torch.Tensor:
        try:
            return tensor_from_wire(obj)
        except DumpFormatError as e:
            raise ValueError(str(e).removeprefix("$: ").removeprefix("$")) from None
    raise NotImplementedError(f"cannot decode {typ}")


class _Peek(msgspec.Struct):
    schema_version: Any = None


_msgpack_enc = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
_msgpack_dec = msgspec.msgpack.Decoder(DumpAny, dec_hook=_dec_hook)
_msgpack_peek = msgspec.msgpack.Decoder(_Peek)
_json_enc = msgspec.json.Encoder(enc_hook=_enc_hook)
_json_dec = msgspec.json.Decoder(DumpAny, dec_hook=_dec_hook)
_json_peek = msgspec.json.Decoder(_Peek)


def check_version(version: Any, source: str) -> None:
    """Refuse a dump of a schema version we do not know, naming it."""
    # An int and nothing else: a .pt may carry any object here (a tensor would not even compare).
    if isinstance(version, bool) or not isinstance(version, int) or version != SCHEMA_VERSION:
        if version is None:
            raise SchemaVersionError(f"{source}: schema_version: missing")
        shown = repr(version)[:40] if isinstance(version, (int, float, str)) else f"a {type(version).__name__}"
        raise SchemaVersionError(
            f"{source}: schema_version: {shown} is not supported by this release (it reads {SCHEMA_VERSION})"
        )


def _decode(data: bytes, fmt: str, source: str) -> Dump:
    peek, dec = (_msgpack_peek, _msgpack_dec) if fmt == "msgpack" else (_json_peek, _json_dec)
    try:
        head = peek.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError) as e:  # msgspec lets a bad UTF-8 str through as the latter
        raise DumpFormatError(f"{source}: not a {fmt} dump: {e}") from None
    except RecursionError:  # msgspec refuses nesting deeper than the interpreter's limit
        raise DumpFormatError(f"{source}: not a {fmt} dump: nested too deeply") from None
    check_version(head.schema_version, source)
    try:
        return dec.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as e:
        raise DumpFormatError(f"{source}: {e}") from None
    except RecursionError:
        raise DumpFormatError(f"{source}: nested too deeply") from None


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def encode(dump: Dump, fmt: str = "msgpack") -> bytes:
    """Serialize a dump to bytes: ``msgpack``, ``json`` or ``pt`` (SGLang's layout)."""
    try:
        if fmt == "msgpack":
            return _msgpack_enc.encode(dump)
        if fmt == "json":
            return _json_enc.encode(dump)
    except (OverflowError, UnicodeEncodeError, msgspec.EncodeError) as e:  # an int past 64 bits, a str no UTF-8 holds
        raise DumpFormatError(f"cannot encode the dump as {fmt}: {e}") from None
    if fmt == "pt":
        return _torch_bytes(to_sglang_dict(dump))
    raise DumpFormatError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def decode(data: bytes, fmt: str | None = None, source: str = "<bytes>") -> Dump:
    """Deserialize bytes produced by :func:`encode` (the format is detected when not given)."""
    fmt = fmt or sniff(data[:16], source)
    if fmt == "pt":
        from .sglang import from_sglang_dict, torch_load

        return from_sglang_dict(torch_load(io.BytesIO(data), len(data), source), source)
    if fmt == "csv":
        raise DumpFormatError(f"{source}: CSV dumps are read from files only")
    return _decode(data, fmt, source)


def sniff(head: bytes, source: str) -> str:
    """The format of a dump from its first bytes."""
    if not head:
        raise DumpFormatError(f"{source}: empty (0 bytes)")
    if head.startswith(b"\xef\xbb\xbf"):
        raise DumpFormatError(f"{source}: starts with a UTF-8 byte-order mark; a JSON dump has none (save it without)")
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "pt"  # torch.save's zip, or a legacy pickle
    if head.lstrip()[:1] in (b"{", b"["):
        return "json"
    if head.startswith(b"layer_id"):
        return "csv"
    if head[:1] and (0x80 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF)):
        return "msgpack"
    raise DumpFormatError(f"{source}: unknown format (not .pt, msgpack, JSON or SGLang's CSV)")


_NOT_REGULAR = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def check_regular_file(path: str) -> None:
    """Refuse, naming it, a path that is not a regular file, before anything opens it: opening a
    FIFO waits for a writer (forever), and a device such as /dev/zero never ends."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # missing, no permission: the open that follows says so
    if stat.S_ISDIR(mode):
        raise DumpFormatError(f"{path}: is a directory; pass a file")
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _NOT_REGULAR if test(mode)), "a special file")
        raise DumpFormatError(f"{path}: is {kind}, not a regular file; pass a dump file")


def detect_format(path: str) -> str:
    """The format of the dump file ``path`` from its first bytes."""
    check_regular_file(path)
    with open(path, "rb") as f:
        return sniff(f.read(16), path)


def load_dump(path: str | os.PathLike[str]) -> Dump:
    """Load a dump from any format we know, ours or SGLang's own files (``.pt``, legacy ``.csv``).

    The format is detected from the content. ``.pt`` files load with ``weights_only=True``:
    loading never runs code.

    >>> dump = load_dump("expert_distribution_recorder_1700000000.0.pt")  # doctest: +SKIP
    """
    path = os.fspath(path)
    fmt = detect_format(path)  # refuses a folder, a FIFO or a device first
    if fmt == "pt":
        return load_sglang_pt(path)
    if fmt == "csv":
        return load_legacy_csv(path)
    with open(path, "rb") as f:
        return _decode(f.read(), fmt, path)


def format_for_path(path: str) -> str:
    suffix = os.path.splitext(path)[1].lower()
    fmt = _SUFFIXES.get(suffix)
    if fmt is None:
        raise DumpFormatError(f"{path}: unknown suffix {suffix!r}; use .pt, .msgpack or .json")
    return fmt


def write_atomic(path: str | os.PathLike[str], data: bytes, what: str = "the file", *, exclusive: bool = False) -> str:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename): a reader never sees
    half a file, and a failed write leaves no temporary behind. Raises ``OSError`` naming ``path``.

    ``exclusive``: never replace an existing ``path`` (``FileExistsError``), checked in the same
    step that puts the file in place (a hard link), so two writers cannot both win."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    try:
        if os.path.isdir(path):  # say so before writing a temporary that the rename would refuse
            raise IsADirectoryError(errno.EISDIR, "is a directory; pass a file name")
        # 0o666 through the umask, like any file the user writes (mkstemp would force 0o600).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            _link_exclusive(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            # Name the file asked for (not the temporary one) and the cause: no such folder, disk full...
            raise OSError(e.errno, f"cannot write {what}: {e.strerror}", path) from e
        raise
    return path


def _link_exclusive(tmp: str, path: str) -> None:
    """Put ``tmp`` in place at ``path`` unless ``path`` exists (then ``FileExistsError``)."""
    try:
        os.link(tmp, path)  # atomic, and fails where path exists
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: check, then rename (a narrow race)
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def save_torch(obj: Any, path: str | os.PathLike[str], what: str = "the file") -> str:
    """``torch.save`` of ``obj`` to ``path``, written through :func:`write_atomic` (torch's own
    writer is not atomic and fails with a bare RuntimeError on a missing folder)."""
    return write_atomic(path, _torch_bytes(obj), what)


def save_dump(dump: Dump, path: str | os.PathLike[str], *, format: str | None = None, exclusive: bool = False) -> str:
    """Write a dump atomically (temporary file, fsync, rename); the format comes from the suffix.
    ``exclusive``: refuse to replace an existing file (``FileExistsError``)."""
    path = os.fspath(path)
    return write_atomic(path, encode(dump, format or format_for_path(path)), "the dump", exclusive=exclusive)
