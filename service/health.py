"""``/metrics``, ``/livez`` and ``/readyz``, served from the worker's own event loop.

A probe answered by the loop proves the loop is not blocked, which a server thread would not.
The server speaks just enough HTTP/1.1 for Prometheus and orchestrator probes: GET and HEAD,
one request per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

_REQUEST_TIMEOUT = 5.0
_MAX_HEADER_BYTES = 16 * 1024


class HealthServer:
    """Serves the metrics and two probes: ``metrics`` returns the content type and body of
    ``/metrics``; ``live``/``ready`` return (ok, reason)."""

    def __init__(
        self,
        *,
        metrics: Callable[[], tuple[str, bytes]],
        live: Callable[[], tuple[bool, str]],
        ready: Callable[[], tuple[bool, str]],
    ) -> None:
        self._metrics = metrics
        self._live = live
        self._ready = ready
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._handle, host, port)
        sockname = self._server.sockets[0].getsockname()
        return sockname[0], sockname[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            if len(head) > _MAX_HEADER_BYTES:
                raise ValueError("headers too large")
            method, path, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            status, content_type, body = self._route(method, path.split("?", 1)[0])
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            )
            if method != "HEAD":
                writer.write(body)
            await writer.drain()
        except (TimeoutError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            with contextlib.suppress(ConnectionError):
                writer.write(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _route(self, method: str, path: str) -> tuple[str, str, bytes]:
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"use GET\n"
        if path == "/metrics":
            content_type, body = self._metrics()
            return "200 OK", content_type, body
        if path in ("/livez", "/readyz"):
            ok, reason = (self._live if path == "/livez" else self._ready)()
            status = "200 OK" if ok else "503 Service Unavailable"
            return status, "text/plain", (reason + "\n").encode()
        return "404 Not Found", "text/plain", b"try /metrics, /livez or /readyz\n"
