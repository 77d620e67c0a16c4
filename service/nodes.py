"""The broker nodes one process may use: a comma-separated list of AMQP URLs, shuffled once.

``HUTCH_BROKER_URL`` (or the file ``HUTCH_BROKER_URL_FILE`` names) may list several nodes of one
RabbitMQ cluster, each a full URL with its own credentials and TLS options::

    amqps://hutch:s3cret@rabbit-1:5671/prod?cafile=/ca.pem,amqps://hutch:s3cret@rabbit-2:5671/prod

Each process shuffles the list once, so a fleet of hosts spreads over the nodes instead of all
crowding the first. Every connection of the process (the consumer, the result publisher, the
scheduler, the fan-in, a client) starts at the process's *current* node and, when it cannot
connect or loses its connection, moves the current node on to the next in the shuffled order,
so they all fail over together rather than each rediscovering a dead node.

Kept free of the AMQP library, so that settings (and `hutch worker --help`) can parse and check
the list without loading it. This is also where a URL's password is masked for logs and errors.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit, urlunsplit

SCHEMES = {"amqp": 5672, "amqps": 5671}


def safe_url(url: str) -> str:
    """The URL (or comma-separated URL list) with every password masked, for logs and errors."""
    if "," in url:
        return ",".join(safe_url(one) for one in url.split(","))
    try:
        parts = urlsplit(url.strip())
        password = parts.password
    except ValueError:  # unparseable (a bad port, say): mask whatever follows the user name
        user, at, host = url.rpartition("@")
        return f"{user.split(':')[0]}:******@{host}" if at and ":" in user else url
    if password is None:
        return url.strip()
    userinfo, host = parts.netloc.rsplit("@", 1)
    return urlunsplit(parts._replace(netloc=userinfo.split(":")[0] + ":******@" + host))


def vhost_of(url: str) -> str:
    """The virtual host an AMQP URL names: its path without the leading slash, or ``/``."""
    path = urlsplit(split_urls(url)[0] if "," in url else url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def split_urls(text: str) -> list[str]:
    """The URLs of a comma-separated list, blanks dropped (a password containing a comma must
    be written ``%2C``)."""
    return [url.strip() for url in text.split(",") if url.strip()]


def check_url(url: str) -> str:
    """``url`` if it is a usable AMQP URL, else `ValueError` saying what is wrong (masked)."""
    shown = safe_url(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{shown} is not a URL ({exc})") from None
    if parts.scheme not in SCHEMES:
        raise ValueError(
            f"{shown} is not an AMQP URL: it must start with amqp:// or amqps:// "
            "(e.g. amqp://user:password@rabbit:5672/vhost)"
        )
    if not parts.hostname:
        raise ValueError(f"{shown} names no host (e.g. amqp://user:password@rabbit:5672/)")
    if port == 0:
        raise ValueError(f"{shown} has port 0")
    return url


def parse_urls(text: str) -> list[str]:
    """Check a comma-separated list of AMQP URLs; raises `ValueError` naming the bad one."""
    urls = split_urls(text)
    if not urls:
        raise ValueError("no broker URL given (e.g. amqp://user:password@rabbit:5672/)")
    for index, url in enumerate(urls, 1):
        try:
            check_url(url)
        except ValueError as exc:
            where = f"URL {index} of {len(urls)}: " if len(urls) > 1 else ""
            raise ValueError(f"{where}{exc}") from None
    vhosts = sorted({vhost_of(url) for url in urls})
    if len(vhosts) > 1:
        raise ValueError(
            f"the URLs name different virtual hosts ({', '.join(map(repr, vhosts))}); "
            "list the nodes of one cluster, each with the same vhost"
        )
    return urls


@dataclass(frozen=True)
class Node:
    """One broker URL and how it is shown: ``address`` (``host:port``, the metric label) and
    ``safe`` (the URL, password masked)."""

    url: str

    @property
    def address(self) -> str:
        parts = urlsplit(self.url)
        host = parts.hostname or "localhost"
        port = parts.port or SCHEMES.get(parts.scheme, 5672)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def safe(self) -> str:
        return safe_url(self.url)


class Nodes:
    """The process's broker nodes in their shuffled order, and which one is current.

    ``urls`` is a URL, a comma-separated list or a sequence of URLs; they are checked
    (`ValueError`) and, with ``shuffle`` (the default), shuffled once here. `failed` moves the
    current node on only if the one that failed is still current, so two connections losing the
    same node move past it once, not twice.
    """

    def __init__(self, urls: str | Sequence[str], *, shuffle: bool = True) -> None:
        text = urls if isinstance(urls, str) else ",".join(urls)
        listed = [Node(url) for url in parse_urls(text)]
        if shuffle:
            random.shuffle(listed)
        self.all: tuple[Node, ...] = tuple(listed)
        self._current = 0

    @property
    def current(self) -> Node:
        return self.all[self._current]

    @property
    def vhost(self) -> str:
        return vhost_of(self.all[0].url)

    def order(self) -> Iterator[Node]:
        """Every node once, from the current one on: the order to try them in."""
        start = self._current
        for step in range(len(self.all)):
            yield self.all[(start + step) % len(self.all)]

    def failed(self, node: Node) -> None:
        """``node`` could not be reached or was lost: if it is current, the next one is."""
        if self.all[self._current] == node:
            self._current = (self._current + 1) % len(self.all)

    def use(self, node: Node) -> None:
        """``node`` answered: it is the current one now."""
        self._current = self.all.index(node)

    def __len__(self) -> int:
        return len(self.all)

    def __str__(self) -> str:
        """Every URL, passwords masked, in the order they are tried."""
        return ", ".join(node.safe for node in self.order())
