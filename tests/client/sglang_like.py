"""A server that answers as a stock SGLang 0.5.23 does (``sglang/srt/entrypoints/http_server.py``).

SGLang's server cannot start on a CPU machine, so its three handlers are reproduced here: GET and
POST, no body read, always 200 with one line of text and no content type (Starlette's ``Response``
without ``media_type``); the dump goes to ``expert_distribution_recorder_{time}.pt`` in its
directory and never into the answer; other paths get FastAPI's 404 ``{"detail": "Not Found"}``.
The recorder behind it is a real one; SGLang's ``.pt`` layout comes from our SGLang codec.
"""

from __future__ import annotations

import json
import os
from typing import Any

from moe_record_sdk import Recorder
from moe_record_sdk.schema import sglang_file_name

ANSWERS = {
    "/start_expert_distribution_record": b"Start recording the expert distribution.\n",
    "/stop_expert_distribution_record": b"Stop recording the expert distribution.\n",
    "/dump_expert_distribution_record": b"Dump expert distribution record.\n",
}


class SGLangLike:
    def __init__(self, recorder: Recorder, dump_dir: str) -> None:
        self.recorder, self.dump_dir = recorder, dump_dir

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path in ANSWERS and method in ("GET", "POST"):
            if path.startswith("/start"):
                self.recorder.start()
            elif path.startswith("/stop"):
                self.recorder.stop()
            else:
                os.makedirs(self.dump_dir, exist_ok=True)
                dump = self.recorder.dump()
                dump.save(os.path.join(self.dump_dir, sglang_file_name(dump)))
            status, headers, body = 200, [], ANSWERS[path]
        else:
            body = json.dumps({"detail": "Not Found"}).encode()
            status, headers = 404, [(b"content-type", b"application/json")]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
