"""A pool child's side of claim checks: what came by reference is read back here, and a result
too large for a message goes to the store from here. The parent never touches a blob.

- **A body given by reference** (the client offloaded the whole encoded body, docs/protocol.md
  §13): the body is one reference whose blob is the real body, of the message's content type.
  `Blobs.body` reads it, verified, and the job goes on as if it had come inline.
- **References among the arguments** (passed explicitly: `service.Client.put_file`, or another
  language's producer) become what the task's parameter asks for, by its annotation: ``Ref``
  gets the reference itself, to open when it likes (``ref.open()``, ``ref.fetch()``); a path
  type (``pathlib.Path``) gets a local file; a binary stream type (``typing.BinaryIO``,
  ``IO[bytes]``) gets an open, verifying stream, closed after the task; anything else gets the
  ``bytes``. A reference inside a container follows the first of those types found in the
  container's annotation (``list[Path]``). Every reference of a job is checked against the
  store's allow-list before any blob is read.
- **A result** whose encoded envelope exceeds ``HUTCH_OFFLOAD_THRESHOLD` goes to the store, and
  the reply carries its reference instead (`Blobs.offload`); the same for the messages that
  follow a flow's step.

Errors are the store's own (`service.store.errors`); `service.pool.child` turns them into
outcomes. With no store configured, any reference is a `BadReference`: nothing to follow it in.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import os
import pathlib
import tempfile
import typing
from collections.abc import Callable
from enum import Enum
from typing import TYPE_CHECKING, Any, Final

from service import protocol
from service.errors import ConfigError
from service.store.errors import BadReference, StoreUnavailable
from service.store.refs import Ref, is_marker, resolve_refs

if TYPE_CHECKING:
    from service.store.base import Store


class Want(Enum):
    """What a task parameter asks a reference to become."""

    BYTES = "bytes"
    REF = "ref"
    PATH = "path"
    STREAM = "stream"


_STREAM_TYPES: Final = (typing.BinaryIO, typing.IO, io.BufferedReader, io.BufferedIOBase)


def _want_of(annotation: Any) -> Want:
    if annotation is Ref:
        return Want.REF
    if isinstance(annotation, type):
        if issubclass(annotation, pathlib.PurePath | os.PathLike):
            return Want.PATH
        if issubclass(annotation, io.IOBase):
            return Want.STREAM
    if annotation in _STREAM_TYPES or typing.get_origin(annotation) is typing.IO:
        return Want.STREAM
    if annotation is os.PathLike or typing.get_origin(annotation) is os.PathLike:
        return Want.PATH
    for inner in typing.get_args(annotation):
        want = _want_of(inner)
        if want is not Want.BYTES:
            return want
    return Want.BYTES


@functools.lru_cache(maxsize=1024)
def _wants(fn: Callable[..., Any]) -> tuple[tuple[Want, ...], Want, dict[str, Want], Want]:
    """Per task function: the wants of its positional parameters in order, of ``*args``, of
    its named parameters, and of ``**kwargs``. Unresolvable annotations count as none."""
    try:
        signature = inspect.signature(fn)
        hints = typing.get_type_hints(fn)
    except (TypeError, ValueError, NameError):
        return (), Want.BYTES, {}, Want.BYTES
    positional: list[Want] = []
    named: dict[str, Want] = {}
    star = star_star = Want.BYTES
    for parameter in signature.parameters.values():
        want = _want_of(hints.get(parameter.name))
        kind = parameter.kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            star = want
        elif kind is inspect.Parameter.VAR_KEYWORD:
            star_star = want
        else:
            if kind is not inspect.Parameter.KEYWORD_ONLY:
                positional.append(want)
            if kind is not inspect.Parameter.POSITIONAL_ONLY:
                named[parameter.name] = want
    return tuple(positional), star, named, star_star


class Blobs:
    """The child's claim checks; the store is opened on first use (`service.store.active`)."""

    def __init__(self) -> None:
        self._store: Store | None = None
        self._offloading: bool | None = None

    def store(self) -> Store:
        from service.store import active  # the stores load with the first reference

        if self._store is None:
            if not active.configured():
                raise BadReference(
                    "this worker has no blob store (HUTCH_STORE_URL unset), so it follows no "
                    "reference: configure the store the producer used, then replay"
                )
            try:
                self._store = active.active_store()
            except ConfigError as exc:  # the share not mounted (yet), boto3 missing
                raise StoreUnavailable(f"cannot open the blob store: {exc}") from None
        return self._store

    @property
    def offloading(self) -> bool:
        """Whether output may go to a store; without ``HUTCH_STORE_URL`` the store modules
        are never imported."""
        if self._offloading is None:
            self._offloading = bool(os.environ.get("HUTCH_STORE_URL", "").strip())
            if self._offloading:
                from service.store import active

                self._offloading = active.configured()
        return self._offloading

    @property
    def threshold(self) -> int:
        from service.store import active

        return active.settings().offload_threshold

    # -- coming in -----------------------------------------------------------------------

    def body(self, content_type: str, value: Any) -> bytes:
        """The real body behind a body that is one reference (``value``, decoded)."""
        ref = Ref.from_wire(value)
        if protocol.media_type(ref.content_type) != protocol.media_type(content_type):
            raise BadReference(
                f"the body's blob is {ref.content_type!r}, not the message's {content_type!r}"
            )
        return self.store().get_bytes(ref)

    def arguments(
        self,
        fn: Callable[..., Any],
        args: list[Any],
        kwargs: dict[str, Any],
        cleanup: contextlib.ExitStack,
    ) -> tuple[list[Any], dict[str, Any]]:
        """``args`` and ``kwargs`` with every reference replaced as the parameters ask.
        Streams and downloaded files are released by ``cleanup`` after the task."""
        store = self.store()
        refs: list[Ref] = []

        def collect(ref: Ref) -> Ref:
            store.check(ref)  # every ref allowed before any blob is read
            refs.append(ref)
            return ref

        resolve_refs(args, collect)
        resolve_refs(kwargs, collect)
        if not refs:
            return args, kwargs
        positional, star, named, star_star = _wants(fn)
        scratch: list[str] = []

        def directory() -> str:
            if not scratch:
                scratch.append(cleanup.enter_context(tempfile.TemporaryDirectory()))
            return scratch[0]

        def resolver(want: Want) -> Callable[[Ref], Any]:
            def resolve(ref: Ref) -> Any:
                if want is Want.REF:
                    return ref
                if want is Want.PATH:
                    return store.fetch_to_path(ref, directory())
                if want is Want.STREAM:
                    return cleanup.enter_context(store.open(ref))
                return store.get_bytes(ref)

            return resolve

        def swap(value: Any, want: Want) -> Any:
            return resolve_refs(value, resolver(want)) if _holds_ref(value) else value

        new_args = [
            swap(value, positional[i] if i < len(positional) else star)
            for i, value in enumerate(args)
        ]
        new_kwargs = {
            name: swap(value, named.get(name, star_star)) for name, value in kwargs.items()
        }
        return new_args, new_kwargs

    # -- going out -----------------------------------------------------------------------

    def offload(self, content_type: str, body: bytes) -> bytes | None:
        """A reference body standing for ``body``, if it is over the threshold and a store is
        configured (None otherwise: send it as it is)."""
        if not self.offloading or len(body) <= self.threshold:
            return None
        ref = self.store().put_bytes(body, protocol.media_type(content_type) or content_type)
        return protocol.encode(content_type, ref.to_wire())


def _holds_ref(value: Any) -> bool:
    if isinstance(value, dict):
        return is_marker(value) or any(_holds_ref(v) for v in value.values())
    if isinstance(value, list):
        return any(_holds_ref(v) for v in value)
    return False
