"""The blob store of this process: where a `Ref` is opened when code holds only the ref.

A pool child, a script and a client each reach exactly one store, the one ``HUTCH_STORE_URL``
names, so a task can write ``ref.open()`` or ``service.put_file(path)`` without carrying a
store around. It is opened from the environment on first use (a pool child thus opens its own
after it starts: S3 clients must not cross a fork), or set explicitly (`use_store`), which is
what a `service.Client` given its own store does when none is active yet.
"""

from __future__ import annotations

import os
import threading

from service.store.base import Store
from service.store.config import StoreSettings
from service.store.refs import DEFAULT_CONTENT_TYPE, Ref
from service.store.verify import Readable

_lock = threading.Lock()
_store: Store | None = None
_settings: StoreSettings | None = None


def settings() -> StoreSettings:
    """``HUTCH_STORE_*`` as this process read them, once; raises `ConfigError`."""
    global _settings
    with _lock:
        if _settings is None:
            _settings = StoreSettings.from_env()
        return _settings


def configured() -> bool:
    """True if this process has a store: one set by `use_store`, or ``HUTCH_STORE_URL``."""
    return _store is not None or settings().url is not None


def active_store() -> Store:
    """This process's store, opened on first use; `ConfigError` if none is configured."""
    global _store
    if _store is None:
        opened = settings().open()
        with _lock:
            if _store is None:
                _store = opened
                return _store
        opened.close()  # another thread opened one first
    return _store


def use_store(store: Store | None) -> None:
    """Make ``store`` this process's store (None: forget it, and read the environment again)."""
    global _store, _settings
    with _lock:
        _store = store
        if store is None:
            _settings = None


def put_file(path: str | os.PathLike[str], content_type: str = DEFAULT_CONTENT_TYPE) -> Ref:
    """Store a local file in this process's store, streaming it; pass the `Ref` as a task
    argument (or return it from a task) to hand the file over by reference."""
    return active_store().put_file(path, content_type)


def put_bytes(data: bytes, content_type: str = DEFAULT_CONTENT_TYPE) -> Ref:
    """Store ``data`` in this process's store."""
    return active_store().put_bytes(data, content_type)


def put_stream(source: Readable, content_type: str = DEFAULT_CONTENT_TYPE) -> Ref:
    """Store what ``source.read`` returns, in bounded memory."""
    return active_store().put_stream(source, content_type)
