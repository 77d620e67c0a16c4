"""A small, read-only client for RabbitMQ's management HTTP API (stdlib ``urllib`` only).

Where: ``HUTCH_MANAGEMENT_URL`` if set (it may carry its own ``user:password@``), else
``http://BROKER_HOST:15672`` with the broker URL's host. Credentials default to the broker URL's.
The API needs the ``rabbitmq_management`` plugin and a user tagged at least ``monitoring`` (or
``management`` for its own vhosts). Every failure is a `ManagementUnavailable` saying why.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from service.errors import ManagementUnavailable

DEFAULT_PORT: Final = 15672
URL_VARIABLE: Final = "HUTCH_MANAGEMENT_URL"


class ManagementAPI:
    """GET requests against the management API, with basic auth and a short timeout."""

    def __init__(self, url: str, *, user: str, password: str, timeout: float = 5.0) -> None:
        parts = urlsplit(url)
        netloc = parts.netloc.rpartition("@")[2]
        self.url = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
        self._auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.timeout = timeout

    @classmethod
    def for_broker(cls, broker_url: str, environ: Mapping[str, str] | None = None) -> ManagementAPI:
        environ = os.environ if environ is None else environ
        broker = urlsplit(broker_url)
        user = unquote(broker.username or "guest")
        password = unquote(broker.password or "guest")
        url = environ.get(URL_VARIABLE, "").strip()
        if url:
            parts = urlsplit(url)
            if parts.username is not None:
                user, password = unquote(parts.username), unquote(parts.password or "")
        else:
            host = broker.hostname or "localhost"
            url = f"http://{f'[{host}]' if ':' in host else host}:{DEFAULT_PORT}"
        return cls(url, user=user, password=password)

    def get(self, path: str) -> Any:
        """The decoded JSON answer to ``GET /api/{path}``; None for 404."""
        request = urllib.request.Request(
            f"{self.url}/api/{path}",
            headers={"Authorization": self._auth, "Accept": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.load(response)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            if exc.code in (401, 403):
                raise ManagementUnavailable(
                    f"the management API at {self.url} refused the credentials (HTTP "
                    f"{exc.code}); the user needs the monitoring tag, or set {URL_VARIABLE} "
                    "to http://USER:PASSWORD@HOST:15672"
                ) from None
            raise ManagementUnavailable(
                f"the management API at {self.url} answered HTTP {exc.code}"
            ) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            if isinstance(reason, TimeoutError | socket.timeout):
                reason = f"no answer within {self.timeout:g}s"
            elif isinstance(reason, OSError) and reason.strerror:
                reason = reason.strerror.lower()
            raise ManagementUnavailable(
                f"the management API is not reachable at {self.url} ({reason}); enable it "
                f"with 'rabbitmq-plugins enable rabbitmq_management' or set {URL_VARIABLE}"
            ) from None
        except ValueError as exc:  # not JSON
            raise ManagementUnavailable(
                f"{self.url} did not answer like the management API ({exc})"
            ) from None

    def queues(self, vhost: str) -> list[dict[str, Any]]:
        """Every queue of ``vhost`` with its counts and message rates."""
        columns = ",".join(_COLUMNS)
        answer = self.get(f"queues/{quote(vhost, safe='')}?columns={columns}")
        if answer is None:
            raise ManagementUnavailable(f"the management API does not know vhost {vhost!r}")
        if not isinstance(answer, list):
            raise ManagementUnavailable(f"{self.url} did not answer like the management API")
        return [q for q in answer if isinstance(q, dict)]

    def queue(self, vhost: str, name: str) -> dict[str, Any] | None:
        """One queue's counts and message rates; None if it does not exist."""
        columns = ",".join(_COLUMNS)
        answer = self.get(
            f"queues/{quote(vhost, safe='')}/{quote(name, safe='')}?columns={columns}"
        )
        return answer if isinstance(answer, dict) else None


_COLUMNS: Final = (
    "name",
    "messages_ready",
    "messages_unacknowledged",
    "consumers",
    "message_stats.publish_details.rate",
    "message_stats.deliver_get_details.rate",
    "message_stats.ack_details.rate",
)


def rate(queue: Mapping[str, Any], stat: str) -> float:
    """A message rate per second from a queue's ``message_stats`` (0.0 before any traffic)."""
    details = (queue.get("message_stats") or {}).get(f"{stat}_details") or {}
    value = details.get("rate", 0.0)
    return float(value) if isinstance(value, int | float) else 0.0
