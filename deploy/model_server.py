"""Serve a registered model over HTTP behind a guard: MLflow's own scoring app (the same `/ping`,
`/health`, `/version` and `/invocations` as `mlflow models serve`), wrapped so that requests a web
page or a careless client could abuse it with are refused before they reach the model:

- a Host header other than the configured names (default: 127.0.0.1, localhost) -> 400: a web page
  cannot reach it through DNS rebinding;
- an `Origin` header not in the allowed origins (default: none) -> 403, and any body that is not
  `application/json` -> 415: a page in an operator's browser cannot send a "simple" cross-origin
  request (text/csv, form posts need no CORS preflight), and MLflow answers no preflight;
- a body larger than the limit (default 64 MB) -> 413, counted while it arrives;
- error answers carry the model's one-line message (which row, what is wrong), never a stack
  trace, the request's data or a path of this machine.

The per-image limits (rows per request, bytes and pixels per image, smallest side, `path` inputs off
unless PATCHCORE_SERVE_PATH_ROOTS names folders) are the model's own (pipeline/pyfunc_model.py).

    python -m deploy.model_server --model "models:/patchcore-tiles@champion" --port 5001
                                  (`make serve-model` runs it)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn
from mlflow.pyfunc import scoring_server

from pipeline import credentials

DEFAULT_HOSTS = ("127.0.0.1", "localhost")
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
MODEL_ERROR_MARK = "\nError: "  # MLflow prefixes the model's message with the whole request's data

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def clean_error(body: bytes) -> bytes:
    """An MLflow error answer reduced to its error code and the model's own message."""
    try:
        data = json.loads(body)
    except ValueError:
        return json.dumps({"error_code": "BAD_REQUEST", "message": "the request could not be scored"}).encode()
    message = str(data.get("message") or "")
    if MODEL_ERROR_MARK in message:
        message = message.split(MODEL_ERROR_MARK, 1)[1]
    elif "stack_trace" in data or "unexpected error" in message or "Input:" in message:
        message = "the request could not be scored: send a JSON body with `dataframe_records` rows of `image` bytes"
    message = message.split("\nInput:", 1)[0].strip()[:500] or "the request could not be scored"
    return json.dumps({"error_code": data.get("error_code", "BAD_REQUEST"), "message": message.strip()}).encode()


class Guard:
    """ASGI middleware: Host, origin, method, content type and body size checks, and clean error answers."""

    def __init__(
        self,
        app,
        hosts: tuple[str, ...] = DEFAULT_HOSTS,
        allowed_origins: tuple[str, ...] = (),
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ):
        self.app = app
        self.hosts = {h.lower() for h in hosts}
        self.allowed_origins = set(allowed_origins)
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        name = host[1:].split("]")[0] if host.startswith("[") else host.rsplit(":", 1)[0] if ":" in host else host
        if name.lower() not in self.hosts:
            await _answer(send, 400, f"Host {host!r} is not served here (see --allowed-host)")
            return
        origin = headers.get("origin")
        if origin and origin not in self.allowed_origins:
            await _answer(send, 403, f"cross-origin requests are refused (Origin {origin})")
            return
        if scope["method"] not in ("GET", "HEAD", "POST"):
            await _answer(send, 405, f"method {scope['method']} is not allowed")
            return
        if scope["method"] == "POST":
            content_type = headers.get("content-type", "").split(";")[0].strip().lower()
            if content_type != "application/json":
                await _answer(send, 415, "send the request as Content-Type: application/json")
                return
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
                await _answer(send, 413, f"the request body is larger than {self.max_body_bytes} bytes")
                return
            body = bytearray()  # read it all first (bounded), then hand it to the app
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return
                body += message.get("body", b"")
                if len(body) > self.max_body_bytes:
                    await _answer(send, 413, f"the request body is larger than {self.max_body_bytes} bytes")
                    return
                if not message.get("more_body"):
                    break
            delivered = False

            async def replay() -> dict[str, Any]:
                nonlocal delivered
                if delivered:
                    return await receive()
                delivered = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}

            receive = replay

        status = 200
        held: list[dict[str, Any]] = []

        async def filtered_send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if status >= 400:
                    held.append(message)  # the body decides the length: sent once it is cleaned
                    return
            elif message["type"] == "http.response.body" and status >= 400:
                held.append(message)
                if message.get("more_body"):
                    return
                body = clean_error(b"".join(m.get("body", b"") for m in held[1:]))
                start = dict(held[0])
                start["headers"] = [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ]
                await send(start)
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        await self.app(scope, receive, filtered_send)


async def _answer(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error_code": "BAD_REQUEST", "message": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def build_app(
    model_uri: str,
    hosts: tuple[str, ...] = DEFAULT_HOSTS,
    allowed_origins: tuple[str, ...] = (),
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
):
    """MLflow's scoring app for `model_uri`, behind the Host check and the Guard."""
    os.environ["PATCHCORE_SERVING"] = "1"  # before the model loads: `path` inputs off unless roots are named
    app = scoring_server.init(scoring_server.load_model_with_mlflow_config(model_uri))
    return Guard(app, hosts, allowed_origins, max_body_bytes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help='model URI, e.g. "models:/patchcore-tiles@champion"')
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: loopback only)")
    parser.add_argument("--port", type=int, default=5001)
    parser.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        help="an extra Host header value to accept (e.g. the name a reverse proxy forwards); repeatable",
    )
    parser.add_argument(
        "--allowed-origin",
        action="append",
        default=[],
        help="a web origin allowed to call it (default: none); repeatable",
    )
    parser.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_BYTES / 2**20)
    args = parser.parse_args(argv)
    credentials.apply("viewer")  # read-only: a model server never needs to change the registry
    hosts = tuple(dict.fromkeys([*DEFAULT_HOSTS, args.host, *args.allowed_host]))
    app = build_app(args.model, hosts, tuple(args.allowed_origin), int(args.max_body_mb * 2**20))
    print(f"serving {args.model} on http://{args.host}:{args.port}/invocations (hosts {', '.join(hosts)})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=os.environ.get("PATCHCORE_SERVE_LOG_LEVEL", "info"))
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["Guard", "build_app", "clean_error", "main"]
