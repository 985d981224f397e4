"""ObjectStore: key validation, LocalStore atomicity, S3Store against a real moto server."""

from __future__ import annotations

import os
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

from cssl_core.data.storage import (
    KeyNotFound,
    LocalStore,
    ObjectStore,
    S3Store,
    StoreError,
    default_s3_client,
    join_key,
    open_store,
    redact,
    validate_key,
)

pytest_plugins = ["s3_server"]  # fixtures: moto_server, s3_endpoint, s3_bucket

BAD_KEYS = [
    "../x",
    "a/../../x",
    "/abs",
    "a//b",
    "a\\b",
    "",
    "a/",
    "./a",
    "a/./b",
    ".hidden",
    "a/\x00b",
    "C:/windows",
    "x" * 1025,
]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_validate_key_rejects_with_one_line_message(key: str) -> None:
    with pytest.raises(StoreError) as info:
        validate_key(key)
    assert "\n" not in str(info.value)
    assert str(info.value).startswith("invalid key")


@pytest.mark.parametrize("key", ["a", "memory/p01/manifest.json", "a-b_c.d/e f/g.parquet"])
def test_validate_key_accepts(key: str) -> None:
    assert validate_key(key) == key


def test_join_key() -> None:
    assert join_key("memory", "p01/", "manifest.json") == "memory/p01/manifest.json"
    with pytest.raises(StoreError):
        join_key("memory", "..", "x")


def _round_trip(store: ObjectStore, tmp_path: Path) -> None:
    """The same contract for every backend."""
    assert store.list() == []
    assert not store.exists("a/b.bin")
    with pytest.raises(KeyNotFound):
        store.get_bytes("a/b.bin")

    store.put_bytes("a/b.bin", b"\x00\x01two")
    store.put_bytes("a/c.txt", b"c")
    store.put_bytes("ab/d", b"d")
    store.put_bytes("z", b"")
    assert store.get_bytes("a/b.bin") == b"\x00\x01two"
    assert store.get_bytes("z") == b""
    assert store.exists("a/b.bin") and not store.exists("a/b")
    assert store.list() == ["a/b.bin", "a/c.txt", "ab/d", "z"]
    assert store.list("a/") == ["a/b.bin", "a/c.txt"]
    assert store.list("a") == ["a/b.bin", "a/c.txt", "ab/d"]  # a string prefix, as in S3
    assert store.list("a/b") == ["a/b.bin"]
    assert store.list("nope/") == []

    store.put_bytes("a/b.bin", b"replaced")
    assert store.get_bytes("a/b.bin") == b"replaced"

    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(300_000))
    store.put_file("files/blob.bin", src)
    dst = tmp_path / "out" / "nested" / "blob.bin"
    store.get_file("files/blob.bin", dst)
    assert dst.read_bytes() == src.read_bytes()
    with pytest.raises(KeyNotFound):
        store.get_file("files/missing.bin", tmp_path / "missing.bin")
    assert not (tmp_path / "missing.bin").exists()

    store.delete("a/c.txt")
    store.delete("a/c.txt")  # idempotent
    assert store.list("a/") == ["a/b.bin"]

    for bad in ("../x", "/abs", "a//b", "a\\b"):
        with pytest.raises(StoreError):
            store.put_bytes(bad, b"x")
        with pytest.raises(StoreError):
            store.get_bytes(bad)
        with pytest.raises(StoreError):
            store.exists(bad)
        with pytest.raises(StoreError):
            store.delete(bad)
    with pytest.raises(StoreError):
        store.list("../")

    assert open_store(store.uri).uri == store.uri
    assert store.key_uri("a/b.bin") == f"{store.uri}/a/b.bin"


def test_local_store_round_trip(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    _round_trip(store, tmp_path)
    assert (tmp_path / "store" / "a" / "b.bin").read_bytes() == b"replaced"
    assert not (tmp_path / "store" / "a" / "c.txt").exists()
    # Bad keys never touched the file system outside (or inside) the root.
    assert not (tmp_path / "x").exists()


def test_local_store_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStore(tmp_path)
    store.put_bytes("k/v", b"old")

    def crash(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StoreError, match="No space left on device"):
        store.put_bytes("k/v", b"new")
    monkeypatch.undo()
    assert store.get_bytes("k/v") == b"old"
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["v"]  # no temp file left


def test_local_store_lists_no_in_flight_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_bytes("m/part", b"1")
    (tmp_path / "m" / ".part.tmp-123").write_bytes(b"half")
    (tmp_path / ".hidden-dir").mkdir()
    (tmp_path / ".hidden-dir" / "x").write_bytes(b"x")
    assert store.list() == ["m/part"]


def test_local_store_delete_prunes_empty_directories(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root")
    store.put_bytes("a/b/c", b"1")
    store.delete("a/b/c")
    assert (tmp_path / "root").is_dir()
    assert list((tmp_path / "root").iterdir()) == []


def test_open_store_uris(tmp_path: Path) -> None:
    local = open_store(tmp_path / "x")
    assert isinstance(local, LocalStore) and local.uri == str(tmp_path / "x")
    assert open_store(f"file://{tmp_path}/y").uri == str(tmp_path / "y")
    s3 = open_store("s3://my-bucket/some/prefix/")
    assert isinstance(s3, S3Store)
    assert (s3.bucket, s3.prefix, s3.uri) == (
        "my-bucket",
        "some/prefix",
        "s3://my-bucket/some/prefix",
    )
    assert open_store("s3://my-bucket").uri == "s3://my-bucket"
    with pytest.raises(StoreError, match="unsupported store URI scheme 'gs'"):
        open_store("gs://bucket/x")
    with pytest.raises(StoreError, match="invalid S3 bucket name"):
        open_store("s3://Bad_Bucket/x")
    with pytest.raises(StoreError, match="invalid key"):
        open_store("s3://my-bucket/a/../b")
    with pytest.raises(StoreError):
        open_store("")


def test_default_client_uses_standard_retries() -> None:
    client = default_s3_client()
    assert client.meta.config.retries == {"mode": "standard", "total_max_attempts": 5}


def test_redact_removes_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    text = redact('Could not connect to "http://user:pw@host:9000/b" with s3cr3t-value\nend')
    assert text == 'Could not connect to "http://***@host:9000/b" with *** end'


@pytest.mark.server
def test_s3_store_round_trip(s3_bucket: str, tmp_path: Path) -> None:
    # No client passed: the endpoint comes from AWS_ENDPOINT_URL(_S3) through boto3 itself.
    store = open_store(f"s3://{s3_bucket}/team/cssl")
    _round_trip(store, tmp_path)
    raw = boto3.client("s3")
    keys = [o["Key"] for o in raw.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert sorted(keys) == [
        "team/cssl/a/b.bin",
        "team/cssl/ab/d",
        "team/cssl/files/blob.bin",
        "team/cssl/z",
    ]
    # Objects outside the prefix and keys this API would refuse are not listed.
    raw.put_object(Bucket=s3_bucket, Key="team/other", Body=b"x")
    raw.put_object(Bucket=s3_bucket, Key="team/cssl/folder/", Body=b"")
    assert store.list("a") == ["a/b.bin", "ab/d"]
    assert "folder/" not in store.list()


@pytest.mark.server
def test_s3_store_without_prefix(s3_bucket: str) -> None:
    store = S3Store(s3_bucket)
    store.put_bytes("memory/p01/manifest.json", b"{}")
    assert store.list("memory/") == ["memory/p01/manifest.json"]
    assert store.uri == f"s3://{s3_bucket}"


@pytest.mark.server
def test_s3_errors_are_one_line_and_carry_no_credentials(s3_endpoint: str) -> None:
    store = S3Store("no-such-bucket-here", "p")
    with pytest.raises(StoreError) as info:
        store.put_bytes("k", b"x")
    message = str(info.value)
    assert message.startswith("put s3://no-such-bucket-here/p/k: NoSuchBucket")
    assert "\n" not in message
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in message
    assert os.environ["AWS_ACCESS_KEY_ID"] not in message

    once = Config(retries={"mode": "standard", "total_max_attempts": 1}, connect_timeout=2)
    client = boto3.client("s3", endpoint_url="http://user:pw@127.0.0.1:9", config=once)
    unreachable = S3Store("bucket", client=client)
    with pytest.raises(StoreError) as info:
        unreachable.get_bytes("k")
    message = str(info.value)
    assert "EndpointConnectionError" in message
    assert "pw@" not in message and os.environ["AWS_SECRET_ACCESS_KEY"] not in message
