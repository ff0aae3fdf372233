"""How every InferGrid node serves HTTP: uvicorn with uvloop and httptools, in the foreground or
on a background thread (tests, and processes that serve beside other work)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Self

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from infergrid.protocol.openai_types import error_body


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (unknown path, wrong method) in OpenAI's error shape."""
    assert isinstance(exc, HTTPException)
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return JSONResponse(error_body(message, type=kind), status_code=exc.status_code)


async def server_error(request: Request, exc: Exception) -> Response:
    """A bug, as a 500 in OpenAI's error shape that names only the exception's type."""
    return JSONResponse(
        error_body(f"Internal error: {type(exc).__name__}", type="server_error"), status_code=500
    )


# A node's app passes these to Starlette(exception_handlers=...).
ERROR_HANDLERS = {HTTPException: http_error, Exception: server_error}


def uvicorn_config(app: Starlette, host: str, port: int, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=5,
    )


def serve(app: Starlette, host: str, port: int, *, log_level: str = "warning") -> None:
    """Serve until interrupted."""
    uvicorn.Server(uvicorn_config(app, host, port, log_level)).run()


class ServerThread:
    """A server on a background thread; port 0 picks one. Use as a context manager, or
    start() and stop(); `url` is the base URL."""

    what = "server"  # for the error when it does not start

    def __init__(
        self, app: Starlette, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"
    ) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        self.host = host
        self.port: int = self._socket.getsockname()[1]
        self.server = uvicorn.Server(uvicorn_config(app, host, self.port, log_level))
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> Self:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the {self.what} did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        self._socket.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
