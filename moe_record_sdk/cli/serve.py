"""``moe-record serve``: the reference engine (a PyTorch MoE model + recorder) on uvicorn."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import sys

from .. import env
from ..errors import MoeRecordError
from ..schema import MODES
from . import add_command
from .convert import positive_int

#: The line printed once the server accepts connections; the demo reads the URL from it.
READY = "moe-record serve: listening on "


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = add_command(
        sub,
        "serve",
        description="A raw-PyTorch MoE engine (the built-in tiny model, or a transformers MoE config with "
        "random weights) with SGLang's expert-distribution endpoints, POST /generate and GET /health.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=30000, help="port (0: any free port; default 30000, SGLang's)")
    p.add_argument("--hf-config", metavar="PATH", help="a transformers MoE config.json (or its folder): random weights")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--num-layers", type=int, default=4, help="tiny model: layers (default 4)")
    p.add_argument("--num-experts", type=int, default=16, help="tiny model: experts (default 16)")
    p.add_argument("--top-k", type=int, default=2, help="tiny model: experts per token (default 2)")
    p.add_argument(
        "--mode", choices=MODES, default=None, help=f"recording mode (default ${env.MOE_RECORD_MODE} or stat)"
    )
    p.add_argument(
        "--buffer-size",
        type=int,
        default=None,
        help="rows of the per-pass ring (SGLang's buffer; default: none in stat mode, 1000 in per_pass and per_token)",
    )
    p.add_argument(
        "--max-bytes", type=int, default=None, help="per_token: bound on the token and pass rings (default 256 MiB)"
    )
    p.add_argument(
        "--dump-dir",
        default=None,
        help=f"where dump files go (default ${env.MOE_RECORD_DUMP_DIR}, else ${env.SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR}, "
        f"else ${env.VLLM_EXPERT_DISTRIBUTION_RECORDER_DIR}, else /tmp)",
    )
    p.add_argument("--api-key", default=None, help=f"require this bearer token (default ${env.MOE_RECORD_API_KEY})")
    p.add_argument(
        "--api-key-file",
        default=None,
        metavar="PATH",
        help="require the bearer token this file holds (not shown by ps)",
    )
    p.add_argument("--no-control", action="store_true", help="leave the recording endpoints out (404)")
    p.add_argument("--start", action="store_true", help="start recording at once")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.set_defaults(func=run)
    return p


def build(args: argparse.Namespace):  # -> ReferenceEngine
    from ..server.engine import ReferenceEngine

    kwargs = {k: v for k, v in (("buffer_size", args.buffer_size), ("max_bytes", args.max_bytes)) if v is not None}
    if args.hf_config:
        return ReferenceEngine.from_hf_config(args.hf_config, seed=args.seed, mode=args.mode, **kwargs)
    return ReferenceEngine.tiny(
        seed=args.seed,
        num_layers=args.num_layers,
        num_experts=args.num_experts,
        top_k=args.top_k,
        mode=args.mode,
        **kwargs,
    )


def _api_key(args: argparse.Namespace) -> str | None:
    """The bearer token: --api-key-file's, --api-key, or $MOE_RECORD_API_KEY (ValueError naming
    which when it cannot be one)."""
    from ..server.protocol import bearer_token_problem
    from .control import read_api_keys

    if args.api_key_file is not None:
        key = read_api_keys(args.api_key_file, [])
        if not isinstance(key, str):
            raise ValueError(f"--api-key-file {args.api_key_file}: expected one token alone in the file")
        return key
    name, key = (
        ("--api-key", args.api_key) if args.api_key is not None else (f"${env.MOE_RECORD_API_KEY}", env.api_key())
    )
    problem = bearer_token_problem(key) if key else None
    if problem:
        raise ValueError(f"{name}: {problem}")
    return key


def run(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from ..server.threaded import Server, bind

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        max_body = env.max_body()  # from the environment: a bad value is named before the model is built
        args.mode = args.mode or env.mode()
        engine = build(args)
    except (MoeRecordError, OSError, ValueError) as e:
        print(f"moe-record serve: {e}", file=sys.stderr)
        return 2
    dump_dir = args.dump_dir or env.dump_dir("sglang")
    problem = None if args.no_control else _unwritable(dump_dir)
    if problem:  # said now, not at the first dump (a 500 then, the window kept)
        print(f"moe-record serve: dump folder {dump_dir}: cannot write there: {problem}", file=sys.stderr)
        return 2
    try:
        api_key = _api_key(args)
    except ValueError as e:
        print(f"moe-record serve: {e}", file=sys.stderr)
        return 2
    try:
        sock = bind(args.host, args.port)
    except OSError as e:
        print(f"moe-record serve: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    host, port = sock.getsockname()[:2]
    local = ipaddress.ip_address(host.split("%")[0]).is_loopback
    if not local and not api_key and not args.no_control:
        print(
            f"moe-record serve: listening on {host} with no bearer token: whoever reaches port {port} can start, "
            f"stop and dump the recording (--api-key-file PATH, or ${env.MOE_RECORD_API_KEY})",
            file=sys.stderr,
        )
    # Bound to loopback only: a Host naming another machine is a DNS-rebinding page's (403).
    app = engine.app(
        dump_dir=dump_dir, api_key=api_key, enabled=not args.no_control, max_body=max_body, local_only=local
    )
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"  # IPv6 in brackets
    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
    server = Server(config)  # cancels a /generate in flight at SIGTERM / Ctrl-C
    control = "off" if args.no_control else f"on, dumps to {dump_dir}" + (", bearer token required" if api_key else "")
    rec = engine.recorder

    async def serve() -> None:
        if args.start:  # through the endpoints' controller, so the run has its id (run_id, x-moe-record-run)
            await app.handler.controller.start()
        # uvicorn sets `started` once it accepts connections: say so then, not before.
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.01)
        if server.started:
            print(f"{READY}{url}", flush=True)
            print(
                f"  model {engine.name}: {rec.num_layers} layers (MoE {rec.layer_ids}), {rec.num_experts} experts, "
                f"top-{rec.top_k}; mode {rec.mode}; recording endpoints {control}",
                flush=True,
            )
        await task

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
        engine.attachment.detach()
    return 0


def _unwritable(folder: str) -> str | None:
    """Why dumps could not be written into ``folder``, or None; nothing is created (a dump
    creates the folder, as SGLang's does, and dumps that come back in answers need none)."""
    path = os.path.abspath(folder)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        return f"{path} is not a folder"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{path} is not writable"
    return None


def _port(text: str) -> int:
    """An argparse type: a TCP port, 0-65535 (0: any free one)."""
    value = int(text) if text.isdecimal() else -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port in 0-65535, got {text!r}")
    return value
