"""Large data by reference, end to end: real workers, the real broker, a directory store shared
by two workers and a real S3-compatible server (moto, from tests/test_store.py).

Bodies sent to the broker stay small: the offload threshold is set to 64 KiB, so a few hundred
kilobytes are enough to go by reference, and the oversize test refuses 100 KB locally.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from service import Client, TaskError, protocol
from service.errors import MessageTooLarge
from service.store import FileStore, Ref, Store, open_store
from service.store.locations import blob_key
from tests.conftest import Broker, until
from tests.test_store import AWS_ENV, REGION, aws_env, moto_endpoint, s3_admin  # noqa: F401

THRESHOLD = 64 << 10
ENV = {"HUTCH_TASKS": "tests.blob_tasks", "HUTCH_OFFLOAD_THRESHOLD": str(THRESHOLD)}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def blobs_in(root: Path) -> set[str]:
    return {p.name for p in (root / "sha256").glob("*/*")}


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    """The "shared volume": one directory, mounted at the same path for every worker."""
    root = tmp_path / "shared"
    root.mkdir()
    return root


def client_for(vhost: Any, queue: str, store: str | Store | None, **options: Any) -> Client:
    return Client(
        vhost.url, queue=queue, timeout=60, store=store, offload_threshold=THRESHOLD, **options
    )


# -- a directory store shared by two workers ---------------------------------------------------


async def test_offload_round_trip_two_workers(
    start_worker: Any, vhost: Any, queue: str, shared: Path
) -> None:
    env = ENV | {"HUTCH_STORE_URL": f"file://{shared}"}
    await start_worker(**env)
    await start_worker(**env)
    datas = [os.urandom(300_000) for _ in range(6)]

    def run() -> tuple[list[Any], Any]:
        with client_for(vhost, queue, f"file://{shared}") as client:
            small = client.call("tests.blob_tasks.digest", b"tiny", label="inline")
            return [
                client.call("tests.blob_tasks.digest", d, label=str(i)) for i, d in enumerate(datas)
            ], small

    results, small = await asyncio.to_thread(run)
    assert [(r["size"], r["sha256"], r["label"]) for r in results] == [
        (len(d), sha(d), str(i)) for i, d in enumerate(datas)
    ]
    assert small["sha256"] == sha(b"tiny")
    # Each body went to the store; whichever worker took it read it from there.
    assert len(blobs_in(shared)) == len(datas)


async def test_result_offload(start_worker: Any, vhost: Any, queue: str, shared: Path) -> None:
    await start_worker(**ENV, HUTCH_STORE_URL=f"file://{shared}")

    def run() -> tuple[bytes, bytes]:
        with client_for(vhost, queue, f"file://{shared}") as client:
            return client.call("tests.blob_tasks.make", 500_000), client.call(
                "tests.blob_tasks.make", 1000
            )

    big, small = await asyncio.to_thread(run)
    expected = bytes(range(256)) * (500_000 // 256) + bytes(500_000 % 256)
    assert big == expected
    assert len(small) == 1000
    assert len(blobs_in(shared)) == 1  # only the big result's envelope went by reference


async def test_explicit_refs_by_annotation(
    start_worker: Any, vhost: Any, queue: str, shared: Path, tmp_path: Path
) -> None:
    await start_worker(**ENV, HUTCH_STORE_URL=f"file://{shared}")
    source = tmp_path / "input.bin"
    source.write_bytes(os.urandom(200_000))
    want = {"size": 200_000, "sha256": sha(source.read_bytes())}

    def run() -> list[Any]:
        with client_for(vhost, queue, f"file://{shared}") as client:
            ref = client.put_file(source)
            return [
                client.call("tests.blob_tasks.from_path", ref),
                client.call("tests.blob_tasks.from_stream", ref),
                client.call("tests.blob_tasks.from_ref", ref),
                client.call("tests.blob_tasks.digest", ref),
            ]

    by_path, by_stream, by_ref, as_bytes = await asyncio.to_thread(run)
    for seen in (by_path, by_stream, by_ref, as_bytes):
        assert {k: seen[k] for k in want} == want
    assert by_path["path"].startswith(str(shared))  # the file store's own file, not a copy


# -- bad references -----------------------------------------------------------------------------


async def test_bad_refs_dead_letter_at_once(
    start_worker: Any, broker: Broker, queue: str, shared: Path, tmp_path: Path
) -> None:
    worker = await start_worker(**ENV, HUTCH_STORE_URL=f"file://{shared}")
    store = FileStore(str(shared))
    good = store.put_bytes(b"hello")
    outside = tmp_path / "secret"
    outside.write_bytes(b"hello")
    link = shared / "sha256" / "ee"
    link.mkdir(parents=True, exist_ok=True)
    (link / ("e" * 64)).symlink_to(outside)
    cases = {
        "http": Ref("http://169.254.169.254/latest/meta-data", 5, good.sha256),
        "https": Ref("https://example.com/x", 5, good.sha256),
        "dotdot": Ref(f"file://{shared}/../secret", 5, good.sha256),
        "other-root": Ref(f"file://{tmp_path}/secret", 5, good.sha256),
        "other-scheme": Ref(f"s3://bucket/{blob_key(good.sha256)}", 5, good.sha256),
        "checksum": Ref(good.url, 5, sha(b"world")),
        "symlink-out": Ref(f"file://{shared}/sha256/ee/{'e' * 64}", 5, good.sha256),
    }
    ids = {}
    for name, ref in cases.items():
        body = protocol.encode(protocol.MSGPACK, {"args": [ref.to_wire()], "kwargs": {}})
        ids[await broker.publish(queue, "tests.blob_tasks.digest", body=body)] = name
    # A lookalike map with the reserved key is refused too, never passed as data.
    lookalike = protocol.encode(
        protocol.MSGPACK, {"args": [{"$hutch_ref": {"url": good.url}}], "kwargs": {}}
    )
    ids[await broker.publish(queue, "tests.blob_tasks.digest", body=lookalike)] = "lookalike"
    dead = await broker.wait_for(f"{queue}.dlq", len(ids), timeout=60)
    reasons = {ids[m.message_id]: m.headers[protocol.REASON_HEADER] for m in dead}
    assert reasons == dict.fromkeys(ids.values(), "bad_ref")
    attempts = {ids[m.message_id]: m.headers.get(protocol.ATTEMPT_HEADER, 1) for m in dead}
    assert set(attempts.values()) == {1}  # at once: never retried
    import urllib.request

    text = urllib.request.urlopen(worker.metrics_url() + "/metrics", timeout=10).read().decode()
    assert f'hutch_dead_letters_total{{queue="{queue}",reason="bad_ref"}} {len(ids)}.0' in text
    assert f'hutch_blob_ref_failures_total{{kind="corrupt",queue="{queue}"}} 1.0' in text
    refused = len(ids) - 1
    assert f'hutch_blob_ref_failures_total{{kind="refused",queue="{queue}"}} {refused}.0' in text


async def test_missing_blob_is_retried_until_it_appears(
    start_worker: Any, vhost: Any, queue: str, shared: Path
) -> None:
    worker = await start_worker(**ENV, HUTCH_STORE_URL=f"file://{shared}")
    data = os.urandom(1000)
    ref = Ref(f"file://{shared}/{blob_key(sha(data))}", len(data), sha(data))
    forever = Ref(f"file://{shared}/{blob_key('f' * 64)}", 3, "f" * 64)

    def run() -> tuple[Any, BaseException | None]:
        with client_for(vhost, queue, f"file://{shared}") as client:
            try:
                client.call("tests.blob_tasks.digest", forever)
            except TaskError as exc:
                failure: BaseException | None = exc
            else:
                failure = None
            return client.call("tests.blob_tasks.digest", ref), failure

    call = asyncio.create_task(asyncio.to_thread(run))
    # The second call's first attempt finds nothing and is retried with backoff ...
    assert await until(lambda: worker.log().count("BlobMissing") >= 4, timeout=60), worker.log()
    FileStore(str(shared)).put_bytes(data)  # ... then the blob becomes visible
    result, failure = await asyncio.wait_for(call, 60)
    assert result["sha256"] == sha(data)
    assert isinstance(failure, TaskError) and failure.type == "BlobMissing"


# -- the size guard -----------------------------------------------------------------------------


async def test_oversize_without_store_is_refused_and_next_publish_works(
    start_worker: Any, vhost: Any, queue: str
) -> None:
    await start_worker(**ENV)

    def run() -> tuple[BaseException, Any]:
        with client_for(vhost, queue, None, max_message_size=64 << 10) as client:
            with pytest.raises(MessageTooLarge) as refused:
                client.submit("tests.blob_tasks.digest", b"x" * 100_000)
            return refused.value, client.call("tests.blob_tasks.digest", b"x" * 1000)

    refused, after = await asyncio.to_thread(run)
    assert "HUTCH_MAX_MESSAGE_SIZE" in str(refused) and "HUTCH_STORE_URL" in str(refused)
    assert after["size"] == 1000


async def test_worker_without_store_dead_letters_refs(
    start_worker: Any, broker: Broker, queue: str, shared: Path
) -> None:
    await start_worker(**ENV)
    ref = FileStore(str(shared)).put_bytes(b"hello")
    body = protocol.encode(protocol.MSGPACK, {"args": [ref.to_wire()], "kwargs": {}})
    message_id = await broker.publish(queue, "tests.blob_tasks.digest", body=body)
    (dead,) = await broker.wait_for(f"{queue}.dlq", 1, timeout=30)
    assert dead.message_id == message_id
    assert dead.headers[protocol.REASON_HEADER] == "bad_ref"
    assert "HUTCH_STORE_URL" in dead.headers[protocol.ERROR_MESSAGE_HEADER]


# -- a real S3-compatible server ----------------------------------------------------------------


async def test_s3_round_trip_and_result_offload(
    start_worker: Any,
    vhost: Any,
    queue: str,
    moto_endpoint: str,  # noqa: F811 - the fixture
    s3_admin: Any,  # noqa: F811 - the fixture
) -> None:
    bucket = f"hutch-{queue[-12:].lower().replace('_', '-')}"
    s3_admin.create_bucket(Bucket=bucket)
    url = f"s3://{bucket}/blobs"
    s3 = {"HUTCH_STORE_URL": url, "HUTCH_S3_ENDPOINT_URL": moto_endpoint, **AWS_ENV}
    await start_worker(**ENV, **s3)
    store = open_store(url, s3_endpoint_url=moto_endpoint, s3_region=REGION)
    data = os.urandom(300_000)

    def run() -> tuple[Any, bytes]:
        with client_for(vhost, queue, store) as client:
            return client.call("tests.blob_tasks.digest", data), client.call(
                "tests.blob_tasks.make", 400_000
            )

    try:
        seen, big = await asyncio.to_thread(run)
    finally:
        store.close()
    assert (seen["size"], seen["sha256"]) == (len(data), sha(data))
    assert len(big) == 400_000
    keys = [o["Key"] for o in s3_admin.list_objects_v2(Bucket=bucket)["Contents"]]
    assert f"blobs/{blob_key(sha(data))}" not in keys  # the body's blob is the encoded body
    assert len(keys) == 2  # the request body and the result envelope
