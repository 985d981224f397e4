"""Object storage behind one small interface: a local directory or an S3 bucket.

Shards' copies, replay-memory versions and checkpoints are addressed by *keys*: relative,
``/``-separated paths such as ``memory/p01/manifest.json``. Two backends implement
:class:`ObjectStore`:

- :class:`LocalStore` writes every object atomically (temporary file in the same directory,
  ``fsync``, ``os.replace``), so a reader sees either the old object or the new one.
- :class:`S3Store` talks to any S3 API through boto3. Endpoint, region and credentials come
  from the standard AWS chain (``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``,
  ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``~/.aws/config``, instance roles, ...);
  botocore itself reads the endpoint variables, so cssl adds no variables of its own. Calls
  are retried by botocore's ``standard`` retry mode. A single ``PutObject`` is atomic.

:func:`open_store` turns a URI (a local path, ``file://...`` or ``s3://bucket/prefix``) into a
store. Every key is validated by :func:`validate_key` before it is used, including keys read
back from manifests, so no key can escape the store's root. Failures raise
:class:`StoreError` with a one-line message that never contains credentials.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MAX_KEY_BYTES = 1024  # the S3 limit on an object key
_TMP_PREFIX = "."  # in-flight files of LocalStore start with a dot; keys never do
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_USERINFO_RE = re.compile(r"(://)[^/@\s]+@")
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


class StoreError(RuntimeError):
    """A store operation failed, or a key is invalid (the message is one line)."""


class KeyNotFound(StoreError):
    """The key does not exist in the store."""


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe relative object key, else raise :class:`StoreError`.

    A key is a non-empty ``/``-separated relative path whose segments are non-empty, do not
    start with ``.`` (this rules out ``.`` and ``..`` and reserves dot names for in-flight
    temporary files), and contain no backslash or control character; at most 1024 bytes.
    """
    if not isinstance(key, str) or not key:
        raise StoreError(f"invalid key {key!r}: must be a non-empty string")
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise StoreError(f"invalid key {key[:60]!r}...: longer than {MAX_KEY_BYTES} bytes")
    if "\\" in key:
        raise StoreError(f"invalid key {key!r}: backslashes are not allowed, use '/'")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in key):
        raise StoreError(f"invalid key {key!r}: control characters are not allowed")
    if key.startswith("/") or re.match(r"^[A-Za-z]:", key):
        raise StoreError(f"invalid key {key!r}: must be relative, not absolute")
    for segment in key.split("/"):
        if not segment:
            raise StoreError(f"invalid key {key!r}: empty path segment")
        if segment in (".", ".."):
            raise StoreError(f"invalid key {key!r}: '.' and '..' segments are not allowed")
        if segment.startswith("."):
            raise StoreError(f"invalid key {key!r}: segments must not start with '.'")
    return key


def validate_prefix(prefix: str) -> str:
    """A listing prefix: empty, or a key optionally ending with ``/``."""
    if prefix == "":
        return prefix
    validate_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


def join_key(*parts: str) -> str:
    """Join key segments with ``/`` and validate the result."""
    return validate_key("/".join(p.strip("/") for p in parts if p.strip("/")))


def redact(text: str) -> str:
    """Remove anything credential-like from an error text before it reaches a message."""
    text = _USERINFO_RE.sub(r"\1***@", text)
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return " ".join(text.split())[:300]


class ObjectStore(ABC):
    """A flat namespace of byte objects addressed by validated keys."""

    @property
    @abstractmethod
    def uri(self) -> str:
        """Where the store lives; ``open_store(store.uri)`` opens the same store."""

    def key_uri(self, key: str) -> str:
        """The full URI of one key (for messages and lineage tags)."""
        return f"{self.uri.rstrip('/')}/{validate_key(key)}"

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Write an object atomically (readers see the old or the new bytes, never a mix)."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Read an object; :class:`KeyNotFound` when it does not exist."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object exists under ``key``."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys that start with ``prefix`` (a plain string prefix, as in S3)."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete an object; deleting a missing key is not an error (idempotent)."""

    @abstractmethod
    def put_file(self, key: str, path: str | Path) -> None:
        """Upload a local file atomically."""

    @abstractmethod
    def get_file(self, key: str, path: str | Path) -> None:
        """Download an object to a local file, replacing it atomically."""


# -- local directory -----------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f"{_TMP_PREFIX}{path.name}.tmp-{uuid.uuid4().hex[:12]}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """The one way cssl writes a local file: write to the yielded temporary sibling; when the
    block ends without an error the file is fsynced and renamed onto ``path`` (a reader sees
    the old file or the new one, never half of one). On an error the temporary file is removed
    and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically (:func:`atomic_path`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any, **dumps: Any) -> None:
    """Write ``obj`` as indented JSON (plus a newline) to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, **dumps) + "\n")


def atomic_copy_file(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` atomically (:func:`atomic_path`)."""
    with atomic_path(dst) as tmp, open(src, "rb") as fin, open(tmp, "wb") as fout:
        shutil.copyfileobj(fin, fout, length=1 << 20)


class LocalStore(ObjectStore):
    """Objects as files under a root directory (created on the first write)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().absolute()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    @property
    def uri(self) -> str:
        return str(self.root)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    def _fail(self, op: str, key: str, exc: OSError) -> StoreError:
        reason = exc.strerror or exc.__class__.__name__
        return StoreError(f"{op} {self.key_uri(key)}: {reason}")

    def put_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            atomic_write_bytes(path, bytes(data))
        except OSError as exc:
            raise self._fail("put", key, exc) from None

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise KeyNotFound(f"get {self.key_uri(key)}: no such key") from None
        except OSError as exc:
            raise self._fail("get", key, exc) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        validate_prefix(prefix)
        base = self.root
        if "/" in prefix:
            base = self.root.joinpath(*prefix.rsplit("/", 1)[0].split("/"))
        if not base.is_dir():
            return []
        keys: list[str] = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(_TMP_PREFIX)]
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if name.startswith(_TMP_PREFIX):
                    continue
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise self._fail("delete", key, exc) from None
        # Prune now-empty parent directories up to (not including) the root.
        parent = path.parent
        while parent != self.root and self.root in parent.parents:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def put_file(self, key: str, path: str | Path) -> None:
        dst = self._path(key)
        try:
            atomic_copy_file(Path(path), dst)
        except OSError as exc:
            raise self._fail("put", key, exc) from None

    def get_file(self, key: str, path: str | Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise KeyNotFound(f"get {self.key_uri(key)}: no such key")
        try:
            atomic_copy_file(src, Path(path))
        except OSError as exc:
            raise self._fail("get", key, exc) from None


# -- S3 ------------------------------------------------------------------------------------


def default_s3_client(total_max_attempts: int = 5) -> Any:
    """A boto3 S3 client from the standard AWS chain, with botocore's standard retries.

    ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (botocore >= 1.31) select a non-AWS
    endpoint such as MinIO or a moto server; nothing else is read by cssl.
    """
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"mode": "standard", "total_max_attempts": total_max_attempts},
        connect_timeout=10,
        read_timeout=60,
    )
    return boto3.session.Session().client("s3", config=config)


class S3Store(ObjectStore):
    """Objects under ``s3://bucket/prefix``.

    ``client`` defaults to :func:`default_s3_client`; it is created lazily so that building a
    store (for example from a config) needs no network and no credentials.
    """

    def __init__(self, bucket: str, prefix: str = "", client: Any = None) -> None:
        if not _BUCKET_RE.match(bucket or ""):
            raise StoreError(f"invalid S3 bucket name {bucket!r}")
        prefix = prefix.strip("/")
        if prefix:
            validate_key(prefix)
        self.bucket = bucket
        self.prefix = prefix
        self._client = client

    def __repr__(self) -> str:
        return f"S3Store({self.uri!r})"

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = default_s3_client()
        return self._client

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def _key(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _fail(self, op: str, key: str, exc: Exception) -> StoreError:
        """A one-line StoreError from a botocore/boto3 exception, credentials removed."""
        from botocore.exceptions import ClientError

        where = f"{self.uri}/{key}" if key else self.uri  # key was validated by the caller
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", "unknown"))
            message = redact(str(err.get("Message", "")))
            if code in ("NoSuchKey", "404", "NotFound"):
                return KeyNotFound(f"{op} {where}: no such key")
            return StoreError(f"{op} {where}: {code}: {message}".rstrip(": "))
        return StoreError(f"{op} {where}: {exc.__class__.__name__}: {redact(str(exc))}")

    def _call(self, op: str, key: str, fn: Any, **kwargs: Any) -> Any:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kwargs)
        except (ClientError, BotoCoreError, Boto3Error) as exc:
            raise self._fail(op, key, exc) from None

    def put_bytes(self, key: str, data: bytes) -> None:
        self._call(
            "put", key, self.client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data
        )

    def get_bytes(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return bytes(resp["Body"].read())
        except (ClientError, BotoCoreError) as exc:
            raise self._fail("get", key, exc) from None

    def exists(self, key: str) -> bool:
        try:
            self._call("head", key, self.client.head_object, Bucket=self.bucket, Key=self._key(key))
        except KeyNotFound:
            return False
        return True

    def list(self, prefix: str = "") -> list[str]:
        validate_prefix(prefix)
        base = f"{self.prefix}/" if self.prefix else ""
        paginator = self.client.get_paginator("list_objects_v2")
        keys: list[str] = []
        pages = paginator.paginate(Bucket=self.bucket, Prefix=base + prefix)

        def collect() -> None:
            for page in pages:
                for obj in page.get("Contents", []):
                    keys.append(obj["Key"][len(base) :])

        self._call("list", prefix, collect)
        valid = []
        for key in keys:
            try:
                valid.append(validate_key(key))
            except StoreError:
                continue  # e.g. "folder/" markers made by consoles: not objects of ours
        return sorted(valid)

    def delete(self, key: str) -> None:
        self._call("delete", key, self.client.delete_object, Bucket=self.bucket, Key=self._key(key))

    def put_file(self, key: str, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise StoreError(f"put {self.key_uri(key)}: local file {path} does not exist")
        self._call(
            "put",
            key,
            self.client.upload_file,
            Filename=str(path),
            Bucket=self.bucket,
            Key=self._key(key),
        )

    def get_file(self, key: str, path: str | Path) -> None:
        # boto3's managed download writes a temporary sibling and renames it into place.
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._call(
            "get",
            key,
            self.client.download_file,
            Bucket=self.bucket,
            Key=self._key(key),
            Filename=str(path),
        )


def open_store(uri: str | Path, client: Any = None) -> ObjectStore:
    """Open ``s3://bucket[/prefix]`` as :class:`S3Store`, anything else as a local directory.

    ``file:///abs/path`` is accepted; other schemes (``gs://``, ``http://``) are refused.
    ``client`` is passed to :class:`S3Store` (tests, custom sessions).
    """
    text = str(uri)
    if not text:
        raise StoreError("empty store URI; give a directory or s3://bucket/prefix")
    scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", text)
    if scheme is None:
        return LocalStore(text)
    name = scheme.group(1).lower()
    rest = text[len(scheme.group(0)) :]
    if name == "file":
        return LocalStore(rest)
    if name == "s3":
        bucket, _, prefix = rest.partition("/")
        return S3Store(bucket, prefix, client=client)
    raise StoreError(
        f"unsupported store URI scheme {name!r}; use a directory or s3://bucket/prefix"
    )


def download_prefix(uri: str, dest: str | Path) -> Path:
    """Every object under the store URI ``uri`` (e.g. ``s3://raw/2026-12/``) into a new folder
    ``dest/<last component of uri>`` (the folder's name is what an image folder's stream ids
    start with, so it is the prefix's, not a random one); returns that folder.

    Raw frames that land in a bucket are ingested from a local copy: ``cssl refresh --source``
    and ``cssl ingest`` (the DVC stage of a period whose ``source:`` is a prefix) both use this.
    An empty prefix is a :class:`StoreError`.
    """
    store = open_store(uri)
    keys = store.list("")
    if not keys:
        raise StoreError(f"{redact(uri)}: no objects under this prefix")
    name = str(uri).rstrip("/").rsplit("/", 1)[-1] or "source"
    folder = Path(dest) / name
    for key in keys:
        store.get_file(key, folder / key)
    return folder
