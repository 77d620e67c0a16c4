"""The blob-reference test vectors (docs/protocol/vectors/store.json) against hutch's own code.

Every ``ref`` vector must read to its fields and write back to the same map, every
``invalid-ref`` must be refused, every ``not-ref`` must pass through as an ordinary map, every
``blob`` must hash and be named as stated (also by a real file store), and every ``allowed``
and ``refused`` location must be judged so against its store. No S3 needed: the location rules
are the same pure functions the stores call.

Values are plain JSON here: unlike vectors.json, this file has no ``$``-tags, so
``{"$hutch_ref": ...}`` is what it looks like.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import msgpack
import pytest

from service import protocol
from service.errors import EncodeError
from service.store import BadReference, FileStore, Ref, embed_refs, is_marker, resolve_refs
from service.store.config import store_url_parts
from service.store.locations import blob_key, file_path_of, s3_key_of

ROOT = Path(__file__).resolve().parent.parent
VECTORS_FILE = ROOT / "docs/protocol/vectors/store.json"
PROTOCOL = ROOT / "docs/protocol.md"
KINDS = ("ref", "invalid-ref", "not-ref", "blob", "allowed", "refused")
MEMBERS = {
    "ref": {"value", "ref"},
    "invalid-ref": {"value"},
    "not-ref": {"value"},
    "blob": {"content_hex", "size", "sha256", "key"},
    "allowed": {"store", "url", "location"},
    "refused": {"store", "url"},
}
OPTIONAL = {"ref": {"msgpack_hex"}}

DOC: dict[str, Any] = json.loads(VECTORS_FILE.read_text(encoding="utf-8"))
VECTORS: list[dict[str, Any]] = DOC["vectors"]


def of_kind(kind: str) -> list[Any]:
    return [pytest.param(v, id=v["name"]) for v in VECTORS if v["kind"] == kind]


def location(store_url: str, url: str) -> str:
    """What a store at ``store_url`` makes of a reference's url (before any file system)."""
    scheme, bucket, path = store_url_parts(store_url)
    if scheme == "file":
        return file_path_of(url, path)
    return s3_key_of(url, bucket, path)


# -- the file itself -------------------------------------------------------------------------


def test_file_is_well_formed() -> None:
    names = [v["name"] for v in VECTORS]
    assert len(set(names)) == len(names), "vector names must be unique"
    for v in VECTORS:
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", v["name"]), v["name"]
        assert v["kind"] in KINDS, v["name"]
        assert v.get("description"), v["name"]
        members = set(v) - {"name", "kind", "description"}
        required = MEMBERS[v["kind"]]
        assert required <= members <= required | OPTIONAL.get(v["kind"], set()), v["name"]


def test_every_kind_is_covered() -> None:
    assert {v["kind"] for v in VECTORS} == set(KINDS)
    stores = {store_url_parts(v["store"])[0] for v in VECTORS if "store" in v}
    assert stores == {"file", "s3"}


def test_the_protocol_points_to_the_vectors() -> None:
    text = PROTOCOL.read_text(encoding="utf-8")
    section = text.split("## 13. Large data by reference", 1)[1].split("\n## ", 1)[0]
    assert "protocol/vectors/store.json" in section
    assert DOC["spec"].startswith("docs/protocol.md")


# -- references ------------------------------------------------------------------------------


@pytest.mark.parametrize("vector", of_kind("ref"))
def test_ref_reads_and_writes_back(vector: dict[str, Any]) -> None:
    ref = Ref.from_wire(vector["value"])
    assert ref == Ref(**vector["ref"])
    assert ref.to_wire() == vector["value"]
    assert embed_refs([ref]) == [vector["value"]]
    assert resolve_refs({"args": [vector["value"]]}, lambda found: found) == {"args": [ref]}


@pytest.mark.parametrize("vector", [p for p in of_kind("ref") if "msgpack_hex" in p.values[0]])
def test_ref_in_msgpack(vector: dict[str, Any]) -> None:
    body = bytes.fromhex(vector["msgpack_hex"])
    assert protocol.decode(protocol.MSGPACK, body) == vector["value"]
    assert Ref.from_wire(protocol.decode(protocol.MSGPACK, body)) == Ref(**vector["ref"])
    assert msgpack.packb(Ref(**vector["ref"]).to_wire()) == body


@pytest.mark.parametrize("vector", of_kind("invalid-ref"))
def test_invalid_ref_is_refused(vector: dict[str, Any]) -> None:
    assert is_marker(vector["value"])  # it claims to be one, so it may not pass as data
    with pytest.raises(BadReference):
        Ref.from_wire(vector["value"])
    with pytest.raises(BadReference):
        resolve_refs({"kwargs": {"x": vector["value"]}}, lambda found: found)
    with pytest.raises(EncodeError):  # and a client would not have sent it as data
        embed_refs({"x": vector["value"]})


@pytest.mark.parametrize("vector", of_kind("not-ref"))
def test_not_ref_is_an_ordinary_map(vector: dict[str, Any]) -> None:
    assert not is_marker(vector["value"])
    with pytest.raises(BadReference):
        Ref.from_wire(vector["value"])
    assert resolve_refs([vector["value"]], lambda found: pytest.fail("not a ref")) == [
        vector["value"]
    ]
    assert embed_refs([vector["value"]]) == [vector["value"]]


# -- blobs and where they live ---------------------------------------------------------------


@pytest.mark.parametrize("vector", of_kind("blob"))
def test_blob_is_named_by_its_content(vector: dict[str, Any], tmp_path: Path) -> None:
    content = bytes.fromhex(vector["content_hex"])
    assert len(content) == vector["size"]
    assert hashlib.sha256(content).hexdigest() == vector["sha256"]
    assert blob_key(vector["sha256"]) == vector["key"]
    store = FileStore(str(tmp_path))
    ref = store.put_bytes(content)
    assert ref.url == f"file://{tmp_path}/{vector['key']}"
    assert (ref.size, ref.sha256) == (vector["size"], vector["sha256"])


@pytest.mark.parametrize("vector", of_kind("allowed"))
def test_allowed_location(vector: dict[str, Any]) -> None:
    assert location(vector["store"], vector["url"]) == vector["location"]


@pytest.mark.parametrize("vector", of_kind("refused"))
def test_refused_location(vector: dict[str, Any]) -> None:
    with pytest.raises(BadReference):
        location(vector["store"], vector["url"])
