"""The blob store's settings, from ``HUTCH_STORE_*``, ``HUTCH_OFFLOAD_THRESHOLD`` and
``HUTCH_S3_*``, with a `ConfigError` that names the variable for every bad value.

- ``HUTCH_STORE_URL``: ``file:///shared/path`` or ``s3://bucket/prefix``; unset, nothing is
  offloaded.
- ``HUTCH_OFFLOAD_THRESHOLD`` (1 MiB): encoded arguments or results larger than this go to the
  store.
- ``HUTCH_STORE_MAX_SIZE`` (4 GiB): the largest blob put, and the largest a reference may claim.
- ``HUTCH_S3_ENDPOINT_URL``, ``HUTCH_S3_REGION``, ``HUTCH_S3_ADDRESSING_STYLE`` (``path``,
  ``virtual`` or ``auto``): override boto3's own (``AWS_ENDPOINT_URL``, ``AWS_REGION``, ...).

Credentials are deliberately not among them: boto3's chain (``AWS_ACCESS_KEY_ID`` and
``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, web identity, instance metadata) is where operators
already put them, and it refreshes temporary credentials, which a copy in a hutch setting
would not. This module parses; it opens nothing (`StoreSettings.open` does).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, TypeVar
from urllib.parse import urlsplit

from service.errors import ConfigError
from service.settings import parse_size
from service.store.base import DEFAULT_MAX_SIZE, Store

DEFAULT_OFFLOAD_THRESHOLD: Final = 1 << 20
ADDRESSING_STYLES: Final = ("auto", "path", "virtual")
T = TypeVar("T")


def store_url_parts(url: str) -> tuple[str, str, str]:
    """``(scheme, bucket or "", root path or prefix)`` of a store URL; `ConfigError` if it is
    not ``file:///absolute/path`` or ``s3://bucket[/prefix]``. Trailing slashes are dropped."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("file", "s3"):
        raise ConfigError(
            f"HUTCH_STORE_URL {url!r} must be file:///path/on/a/shared/volume or s3://bucket/prefix"
        )
    authority, _, path = rest.partition("/")
    if scheme == "file":
        if authority:
            raise ConfigError(
                f"HUTCH_STORE_URL {url!r}: a file URL has no host (file:///path); mount the "
                "share at the same path on every host instead"
            )
        root = "/" + path.rstrip("/")
        if root == "/":
            raise ConfigError(f"HUTCH_STORE_URL {url!r}: the root must be a directory below /")
        return scheme, "", root
    if not authority:
        raise ConfigError(f"HUTCH_STORE_URL {url!r}: name the bucket, s3://bucket/prefix")
    return scheme, authority, path.strip("/")


def _parse_endpoint(text: str) -> str | None:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{text!r} is not an http:// or https:// URL")
    return text


def _parse_style(text: str) -> str | None:
    if text not in ADDRESSING_STYLES:
        raise ValueError(f"{text!r} is not one of {', '.join(ADDRESSING_STYLES)}")
    return text


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """What ``HUTCH_STORE_*``, ``HUTCH_OFFLOAD_THRESHOLD`` and ``HUTCH_S3_*`` say."""

    url: str | None = None
    offload_threshold: int = DEFAULT_OFFLOAD_THRESHOLD
    max_size: int = DEFAULT_MAX_SIZE
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_addressing_style: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> StoreSettings:
        """Read the environment (default: ``os.environ``); raises `ConfigError`."""
        environ = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = environ.get(name, "").strip()
            return value or None

        def parsed(name: str, parser: Callable[[str], T], default: T) -> T:
            raw = get(name)
            if raw is None:
                return default
            try:
                return parser(raw)
            except ValueError as exc:
                raise ConfigError(f"{name}: {exc}") from None

        url = get("HUTCH_STORE_URL")
        if url is not None:
            store_url_parts(url)  # fail at start-up, not at the first offload
        settings = cls(
            url=url,
            offload_threshold=parsed(
                "HUTCH_OFFLOAD_THRESHOLD", parse_size, DEFAULT_OFFLOAD_THRESHOLD
            ),
            max_size=parsed("HUTCH_STORE_MAX_SIZE", parse_size, DEFAULT_MAX_SIZE),
            s3_endpoint_url=parsed("HUTCH_S3_ENDPOINT_URL", _parse_endpoint, None),
            s3_region=get("HUTCH_S3_REGION"),
            s3_addressing_style=parsed("HUTCH_S3_ADDRESSING_STYLE", _parse_style, None),
        )
        if settings.offload_threshold < 1:
            raise ConfigError("HUTCH_OFFLOAD_THRESHOLD must be at least 1 byte")
        if settings.max_size < settings.offload_threshold:
            raise ConfigError(
                f"HUTCH_STORE_MAX_SIZE ({settings.max_size}) is below HUTCH_OFFLOAD_THRESHOLD "
                f"({settings.offload_threshold}): nothing offloaded could be stored"
            )
        return settings

    def open(self) -> Store:
        """The configured store; `ConfigError` if there is none, or it cannot be opened."""
        if self.url is None:
            raise ConfigError("no blob store configured: set HUTCH_STORE_URL")
        from service.store import open_store

        return open_store(
            self.url,
            max_size=self.max_size,
            s3_endpoint_url=self.s3_endpoint_url,
            s3_region=self.s3_region,
            s3_addressing_style=self.s3_addressing_style,
        )
