"""An S3 client for the remote tier: any S3-compatible object store (AWS S3, MinIO, Ceph RGW, ...).

:func:`connect_s3` builds an :class:`S3Client` for ``LMCACHE_REMOTE_URL=s3://BUCKET[/PREFIX]``
through boto3 (the ``[s3]`` extra). Everything else comes from where every AWS tool looks for it,
so an operator configures it the usual way: the endpoint (``AWS_ENDPOINT_URL``,
``AWS_ENDPOINT_URL_S3``, or ``endpoint_url`` in a profile; unset: AWS itself), the region
(``AWS_REGION``, ``AWS_DEFAULT_REGION``, a profile) and the credentials (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE`` and the shared files, a web identity token as IRSA
mounts it on Kubernetes, an instance role). TLS is always verified; ``AWS_CA_BUNDLE`` names the CA
of a private store. ``LMCACHE_S3_ADDRESSING_STYLE`` picks the addressing: ``auto`` (path-style,
``http://HOST/BUCKET/KEY``, on any endpoint that is not AWS's own, so MinIO and RGW work without
wildcard DNS; virtual-hosted, ``https://BUCKET.s3.amazonaws.com/KEY``, on AWS), ``path`` or
``virtual``.

Objects: the tier's key (``value_key`` / ``side_key``, ``lmc:`` prefix included) behind the URL's
prefix, ``PREFIX/lmc:<namespace16>-tp0pp0-<chunk key>``; a value is one object, and a chunk's block
entry is one small object of its own, under the chunk's first block (``entry_every_block`` is
False: :func:`~.client.entry_fingerprints`). Operations:

  exists_many(keys)            concurrent HEADs (at most ``CONCURRENCY`` at once)
  put(key, value, side_keys)   the value's PUT, then the entries' PUTs (concurrent), so an entry
                               never names a value that is not there yet
  put_many(items)              ``put`` of up to ``CONCURRENCY`` values at once
  get(key)                     GET; ``None`` when there is no such object
  resolve_side_keys(keys)      concurrent GETs of the entries (each read only up to an entry's
                               largest size: a planted large object costs nothing)
  delete_many(keys)            DeleteObjects, 1,000 keys a request
  delete_matching(pattern)     ListObjectsV2 on the pattern's literal start, then DeleteObjects
  list_keys(prefix, limit)     ListObjectsV2 (``LMCACHE_S3_LIST_INTERVAL_SECS``: the catalog's listing)
  expire_many(keys, ttl)       nothing: S3 has no TTL; a bucket lifecycle rule expires objects,
                               and an expired object is a miss like an evicted Redis key
  memory()                     ``(0, 0)``: a bucket has no size bound to report
  ping()                       HeadBucket

Promises:

* thread-safe: one boto3 client, its connection pool sized for ``CONCURRENCY`` requests;
* bounded: a call returns or raises within the timeout (``LMCACHE_BLOCKING_TIMEOUT_SECS``, or the
  caller's), retry and back-off included (:func:`attempt_budget`);
* every failure is one of :mod:`.client`'s errors: :class:`~.client.RemoteAuthError` when the store
  refuses the credentials or none are found (naming where they came from),
  :class:`BucketNotFoundError` (a kind of it: the URL's bucket does not exist),
  :class:`~.client.RemoteUnavailableError` for everything else (unreachable, timed out, 5xx).
  Without boto3, :func:`connect_s3` raises :class:`S3NotInstalledError` naming the extra.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from lmcache_connector.tiers.remote.client import PutItem, RemoteAuthError, RemoteUnavailableError
from lmcache_connector.tiers.remote.value import MAX_ENTRY_BLOCKS
from lmcache_connector.urls import RemoteUrl

if TYPE_CHECKING:
    from lmcache_connector.config import LMCacheConfig

INSTALL_HINT = "pip install 'lmcache-connector[s3]'"
ADDRESSING_STYLES = ("auto", "path", "virtual")
MAX_BACKOFF_S = 1.0  # botocore's standard mode waits at most this long before a first retry
CONCURRENCY = 16  # requests in flight per client: HEADs of a lookup, entries of a write
DELETE_BATCH = 1000  # DeleteObjects takes at most 1,000 keys
MAX_OBJECT_NAME_BYTES = 1024  # S3's limit on a key
# The longest name the tier makes: key prefix (64), the side mark, 16 + rank + 32 hex, dashes.
_LONGEST_TIER_KEY = 64 + 2 + 16 + 1 + 24 + 1 + 32
# An entry is "<key>:<fp>,<fp>,..." of 32-hex fingerprints; a larger object is not an entry.
ENTRY_READ_BYTES = 33 + 33 * MAX_ENTRY_BLOCKS
# Endpoints that are AWS's own: virtual-hosted addressing there, path-style anywhere else.
AWS_HOST_SUFFIXES = (".amazonaws.com", ".amazonaws.com.cn", ".api.aws")
AUTH_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "ExpiredToken",
        "InvalidAccessKeyId",
        "InvalidClientTokenId",
        "InvalidToken",
        "SignatureDoesNotMatch",
        "TokenRefreshRequired",
    }
)
MISSING_KEY_CODES = frozenset({"NoSuchKey", "404", "NotFound"})

_T = TypeVar("_T")
_R = TypeVar("_R")


class S3NotInstalledError(ImportError):
    """An s3:// URL is configured but boto3 is not installed."""


class BucketNotFoundError(RemoteAuthError):
    """The URL's bucket does not exist. A configuration error like refused credentials: the engine
    stops at start with the message (fix ``LMCACHE_REMOTE_URL`` or create the bucket); later, the
    tier treats it as any failure (down, probed again)."""


@dataclass(frozen=True)
class S3Options:
    """Everything but the URL and the AWS environment: the ``LMCACHE_*`` settings that apply here."""

    addressing_style: str = "auto"  # LMCACHE_S3_ADDRESSING_STYLE
    key_prefix: str = "lmc:"  # LMCACHE_REMOTE_KEY_PREFIX, inside the URL's prefix
    timeout_secs: float = 10.0  # one call, retry included
    concurrency: int = CONCURRENCY

    @classmethod
    def from_config(cls, config: LMCacheConfig, socket_timeout_secs: float | None = None) -> S3Options:
        timeout = config.blocking_timeout_secs if socket_timeout_secs is None else socket_timeout_secs
        return cls(
            addressing_style=config.s3_addressing_style,
            key_prefix=config.remote_key_prefix,
            timeout_secs=timeout,
        )


def connect_s3(url: RemoteUrl, config: LMCacheConfig, socket_timeout_secs: float | None = None) -> S3Client:
    """The client for ``url`` with the ``LMCACHE_*`` settings; ``socket_timeout_secs`` overrides
    ``LMCACHE_BLOCKING_TIMEOUT_SECS``. Sends nothing: call :meth:`S3Client.ping` to check the store."""
    return connect_s3_with(url, S3Options.from_config(config, socket_timeout_secs))


def connect_s3_with(url: RemoteUrl, options: S3Options) -> S3Client:
    """:func:`connect_s3` from :class:`S3Options` (tests and benchmarks set them directly)."""
    boto3, botocore = _import_boto3()
    if url.kind != "s3" or not url.bucket:
        raise ValueError(f"{url} is not an s3:// URL")
    if options.addressing_style not in ADDRESSING_STYLES:
        raise ValueError(
            f"LMCACHE_S3_ADDRESSING_STYLE={options.addressing_style!r}: expected one of {', '.join(ADDRESSING_STYLES)}"
        )
    object_prefix = f"{url.prefix}/" if url.prefix else ""
    if len(object_prefix.encode()) + _LONGEST_TIER_KEY > MAX_OBJECT_NAME_BYTES:
        raise ValueError(
            f"LMCACHE_REMOTE_URL={url}: the prefix is too long; an S3 object name is at most "
            f"{MAX_OBJECT_NAME_BYTES} bytes and this library's names need {_LONGEST_TIER_KEY} of them"
        )
    try:
        session = boto3.session.Session()
        # Resolved now, once (the environment, the files, a web identity, an instance role), so a
        # refusal can say where the credentials came from; boto3 refreshes temporary ones itself.
        credentials = session.get_credentials()
        probe = session.client("s3", config=_botocore_config(botocore, options, "auto"))
        endpoint = probe.meta.endpoint_url
        style = _addressing(options.addressing_style, endpoint)
        if style == "auto":
            s3 = probe
        else:
            probe.close()
            s3 = session.client("s3", config=_botocore_config(botocore, options, style))
    except botocore.exceptions.ProfileNotFound as exc:
        raise RemoteAuthError(f"{url}: {exc}: check AWS_PROFILE and the AWS config files") from None
    except botocore.exceptions.BotoCoreError as exc:  # unreadable files, a failed role assumption
        raise RemoteAuthError(f"{url}: the AWS settings cannot be used ({type(exc).__name__}: {exc})") from None
    source = credentials.method if credentials is not None else None
    return S3Client(s3, url, options, object_prefix, endpoint, style, source)


class S3Client:
    """One process's connections to an S3 bucket: a :class:`~.client.RemoteClient` (thread-safe:
    boto3 clients are, and the pool of request threads is shared under a lock)."""

    failures_are_partial = False  # one endpoint: a failure means the store, not some keys
    entry_every_block = False  # every entry is a request of its own: one a chunk

    def __init__(
        self,
        s3: Any,
        url: RemoteUrl,
        options: S3Options,
        object_prefix: str,
        endpoint: str,
        addressing: str,
        credential_source: str | None,
    ):
        self._s3 = s3
        self.url = url
        self.options = options
        self.key_prefix = options.key_prefix
        self.bucket: str = url.bucket or ""
        self.object_prefix = object_prefix
        self.endpoint = endpoint
        self.addressing = addressing  # as given to botocore: auto (AWS's own choice), path or virtual
        self._credential_source = credential_source
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"S3Client({self.url} at {self.endpoint}, {self.addressing} addressing)"

    # ------------------------------------------------------------ operations

    def ping(self) -> None:
        """Raise unless the bucket answers (HeadBucket: the endpoint, the credentials and the bucket)."""
        if self._credential_source is None:
            raise RemoteAuthError(
                f"{self.url}: no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "or AWS_PROFILE, or give the pod a role (IRSA)"
            )
        with self._errors("HeadBucket"):
            self._s3.head_bucket(Bucket=self.bucket)

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        """Whether each key exists: one HEAD each, ``CONCURRENCY`` at a time."""
        return self._each(self._exists, keys)

    def put(
        self,
        key: str,
        value: bytes | memoryview,
        side_keys: Sequence[str] = (),
        ttl: int | None = None,
        side_value: str | None = None,
    ) -> None:
        """Write the value, then the block entries (each holding ``side_value``, by default the
        value's key). ``ttl`` is ignored: objects expire by the bucket's lifecycle rules."""
        self._put_value(key, value)
        entry = (key if side_value is None else side_value).encode()
        self._each(lambda side: self._put_small(side, entry), side_keys)

    def put_many(self, items: Sequence[PutItem], ttl: int | None = None) -> None:
        """Several values, up to ``concurrency`` at once (S3 takes one object a request; requests in
        parallel keep the connection pool and the store busy), each value before its entries."""
        self._each(self._put_item, items)

    def get(self, key: str) -> bytes | None:
        """The value, or ``None`` when there is no such object (never written, or expired by a rule)."""
        with self._errors("GetObject"):
            try:
                response = self._s3.get_object(Bucket=self.bucket, Key=self._name(key))
            except self._client_error_type() as exc:
                if _code(exc) in MISSING_KEY_CODES:
                    return None
                raise
            return response["Body"].read()

    def resolve_side_keys(self, keys: Sequence[str]) -> list[str | None]:
        """What each block entry holds, or ``None`` where there is no entry (one GET each, concurrent)."""
        return self._each(self._get_entry, keys)

    def expire_many(self, keys: Sequence[str], ttl: int) -> list[bool]:
        """Nothing to do: S3 has no per-object TTL (a bucket lifecycle rule expires objects by age).
        Every key counts as kept; one that is gone is a miss when it is read."""
        return [True] * len(keys)

    def delete_many(self, keys: Sequence[str]) -> int:
        """Remove the keys, 1,000 per request; how many were removed. S3 does not tell whether a key
        existed, so a key that was already absent counts too."""
        names = [self._name(key) for key in keys]
        return sum(self._delete_names(names[i : i + DELETE_BATCH]) for i in range(0, len(names), DELETE_BATCH))

    def delete_matching(self, pattern: str) -> int:
        """Remove every key matching the glob ``pattern`` (``<prefix><namespace16>-*``): a listing of
        the pattern's literal start, filtered by the whole pattern; how many were removed."""
        literal = pattern
        for i, char in enumerate(pattern):
            if char in "*?[\\":
                literal = pattern[:i]
                break
        removed = 0
        found: list[str] = []
        with self._errors("ListObjectsV2"):
            pages = self._s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.object_prefix + literal
            )
            for page in pages:
                for item in page.get("Contents", ()):
                    name = item["Key"]
                    if fnmatchcase(name[len(self.object_prefix) :], pattern):
                        found.append(name)
                if len(found) >= DELETE_BATCH:
                    removed += self._delete_names(found)
                    found = []
        if found:
            removed += self._delete_names(found)
        return removed

    def list_keys(self, prefix: str, limit: int) -> list[str]:
        """The tier keys starting with ``prefix`` (ListObjectsV2, 1,000 names a request), at most
        ``limit`` of them: what the catalog's periodic listing learns the bucket's chunks from."""
        keys: list[str] = []
        with self._errors("ListObjectsV2"):
            pages = self._s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.object_prefix + prefix
            )
            for page in pages:
                keys.extend(item["Key"][len(self.object_prefix) :] for item in page.get("Contents", ()))
                if len(keys) >= limit:
                    return keys[:limit]
        return keys

    def memory(self) -> tuple[int, int]:
        """``(0, 0)``: a bucket reports no size cheaply and has no bound (lifecycle rules keep it in check)."""
        return 0, 0

    def close(self) -> None:
        self._closed = True
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        try:
            self._s3.close()
        except Exception:  # closing a client whose endpoint is gone must not raise at shutdown
            pass

    # ------------------------------------------------------------ one request each

    def _exists(self, key: str) -> bool:
        with self._errors("HeadObject"):
            try:
                self._s3.head_object(Bucket=self.bucket, Key=self._name(key))
            except self._client_error_type() as exc:
                if _code(exc) in MISSING_KEY_CODES:
                    return False
                raise
        return True

    def _put_value(self, key: str, value: bytes | memoryview) -> None:
        body = value if isinstance(value, bytes) else bytes(value)  # botocore sends bytes, not views
        with self._errors("PutObject"):
            self._s3.put_object(Bucket=self.bucket, Key=self._name(key), Body=body)

    def _put_item(self, item: PutItem) -> None:
        """One value, then its entries one after another (this runs on a pool thread already)."""
        self._put_value(item.key, item.value)
        entry = (item.key if item.side_value is None else item.side_value).encode()
        for side in item.side_keys:
            self._put_small(side, entry)

    def _put_small(self, key: str, body: bytes) -> None:
        with self._errors("PutObject"):
            self._s3.put_object(Bucket=self.bucket, Key=self._name(key), Body=body)

    def _get_entry(self, key: str) -> str | None:
        with self._errors("GetObject"):
            try:
                response = self._s3.get_object(
                    Bucket=self.bucket, Key=self._name(key), Range=f"bytes=0-{ENTRY_READ_BYTES - 1}"
                )
            except self._client_error_type() as exc:
                code = _code(exc)
                if code in MISSING_KEY_CODES:
                    return None
                if code == "InvalidRange":  # an empty object: not an entry, but not an error either
                    return ""
                raise
            raw = response["Body"].read(ENTRY_READ_BYTES)
        # Anything that is not ASCII is not an entry: the tier's decoder then calls it a miss.
        return raw.decode("ascii", errors="replace")

    def _delete_names(self, names: Sequence[str]) -> int:
        if not names:
            return 0
        with self._errors("DeleteObjects"):
            response = self._s3.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": name} for name in names], "Quiet": True}
            )
        errors = response.get("Errors", [])
        if errors:
            first = errors[0]
            code, message = first.get("Code", ""), first.get("Message", "")
            if code in AUTH_CODES:
                raise RemoteAuthError(self._auth_message(code))
            raise RemoteUnavailableError(f"DeleteObjects on {self.url} failed for {len(errors)} keys: {code} {message}")
        return len(names)

    # ------------------------------------------------------------ pieces

    def _name(self, key: str) -> str:
        return self.object_prefix + key

    def _each(self, call: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
        """``call`` on every item, at most ``concurrency`` at once; the first failure is raised."""
        if len(items) <= 1:
            return [call(item) for item in items]
        return list(self._threads().map(call, items))

    def _threads(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._closed:
                raise RemoteUnavailableError(f"the client of {self.url} is closed")
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.options.concurrency, thread_name_prefix="lmcache-s3")
            return self._pool

    def _client_error_type(self) -> type[Exception]:
        return self._s3.exceptions.ClientError

    @contextmanager
    def _errors(self, operation: str) -> Iterator[None]:
        """Turn botocore's exceptions into :mod:`.client`'s, naming what to fix where there is one."""
        from botocore import exceptions as errors

        try:
            yield
        except errors.ClientError as exc:
            raise self._refused(operation, exc) from None
        except (errors.NoCredentialsError, errors.PartialCredentialsError, errors.CredentialRetrievalError) as exc:
            raise RemoteAuthError(
                f"{self.url}: {exc}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, "
                "or give the pod a role (IRSA)"
            ) from None
        except errors.SSLError as exc:
            raise RemoteUnavailableError(
                f"{operation} on {self.url} at {self.endpoint}: TLS failed ({exc}); a private CA goes in AWS_CA_BUNDLE"
            ) from None
        except (errors.BotoCoreError, OSError) as exc:  # unreachable, timed out, connection lost
            raise RemoteUnavailableError(
                f"{operation} on {self.url} at {self.endpoint} failed: {type(exc).__name__}: {exc}"
            ) from None
        except Exception as exc:  # urllib3's own errors can escape a body read
            if type(exc).__module__.startswith(("urllib3", "http.client")):
                raise RemoteUnavailableError(f"{operation} on {self.url} failed: {type(exc).__name__}: {exc}") from None
            raise

    def _refused(self, operation: str, exc: Exception) -> Exception:
        code = _code(exc)
        status = _status(exc)
        if code == "NoSuchBucket" or (operation == "HeadBucket" and status == 404):
            return BucketNotFoundError(
                f"{self.url}: bucket {self.bucket!r} does not exist at {self.endpoint}: create it, or fix "
                "LMCACHE_REMOTE_URL (s3://BUCKET[/PREFIX]) or AWS_ENDPOINT_URL"
            )
        if code in AUTH_CODES or status == 403:
            return RemoteAuthError(self._auth_message(code or str(status)))
        if code == "AuthorizationHeaderMalformed":  # signed for another region than the bucket's
            return RemoteAuthError(f"{self.url}: the request was signed for the wrong region ({code}): set AWS_REGION")
        return RemoteUnavailableError(f"{operation} on {self.url} failed: {code or 'HTTP'} ({status})")

    def _auth_message(self, code: str) -> str:
        source = {
            "env": "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY",
            "shared-credentials-file": "the profile (AWS_PROFILE) in the shared credentials file",
            "config-file": "the profile (AWS_PROFILE) in the AWS config file",
            "assume-role": "the role of the profile (AWS_PROFILE)",
            "assume-role-with-web-identity": "the web identity role (AWS_ROLE_ARN, IRSA)",
            "iam-role": "the instance's role",
            "container-role": "the container's role",
        }.get(self._credential_source or "", f"the credentials ({self._credential_source})")
        return (
            f"{self.url} refused the credentials ({code}): check {source}, and that they may "
            f"s3:GetObject, s3:PutObject, s3:DeleteObject and s3:ListBucket on bucket {self.bucket!r} "
            "(without s3:ListBucket, S3 answers a missing object with AccessDenied)"
        )


# ---------------------------------------------------------------- building


def _import_boto3() -> tuple[Any, Any]:
    try:
        import boto3
        import boto3.session
        import botocore
        import botocore.config
        import botocore.exceptions
    except ImportError:
        raise S3NotInstalledError(
            f"LMCACHE_REMOTE_URL names an S3 store, but boto3 is not installed: {INSTALL_HINT}"
        ) from None
    return boto3, botocore


def _addressing(setting: str, endpoint: str) -> str:
    """The addressing style given to botocore: ``auto`` on AWS's own endpoints (virtual-hosted, or
    path-style for bucket names with dots, which a wildcard certificate cannot cover), ``path`` on
    any other endpoint (MinIO, RGW: no wildcard DNS for bucket host names), or what was asked."""
    if setting != "auto":
        return setting
    host = (urlsplit(endpoint).hostname or "").lower()
    return "auto" if host.endswith(AWS_HOST_SUFFIXES) else "path"


def attempt_budget(timeout_secs: float) -> tuple[int, float]:
    """``(attempts, seconds each)`` so that a call on a hung store fails within ``timeout_secs``.

    Two attempts where the timeout leaves room for them: the second replaces a pooled connection
    the store closed while idle, and rides out one 503 SlowDown; botocore waits up to
    ``MAX_BACKOFF_S`` (jittered) between them. A shorter timeout (the lookups' own client) gets
    one attempt: the tier then counts the failure and probes again, which is cheaper than a wait."""
    if timeout_secs >= 3 * MAX_BACKOFF_S:
        return 2, (timeout_secs - MAX_BACKOFF_S) / 2
    return 1, max(timeout_secs, 0.05)


def _botocore_config(botocore: Any, options: S3Options, style: str) -> Any:
    attempts, per_attempt = attempt_budget(options.timeout_secs)
    settings: dict[str, Any] = {
        "connect_timeout": min(per_attempt, 2.0),
        "read_timeout": per_attempt,
        "retries": {"total_max_attempts": attempts, "mode": "standard"},
        "max_pool_connections": options.concurrency + 2,  # the pool's threads, plus a value's GET/PUT
        "s3": {"addressing_style": style},
        "tcp_keepalive": True,
    }
    defaults = getattr(botocore.config.Config, "OPTION_DEFAULTS", {})
    if "request_checksum_calculation" in defaults:
        # Since boto3 1.36 every PUT carries a CRC32 header and trailer that several S3-compatible
        # stores reject; values carry their own xxh3 checksum, verified on every read.
        settings["request_checksum_calculation"] = "when_required"
        settings["response_checksum_validation"] = "when_required"
    return botocore.config.Config(**settings)


def _code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def _status(exc: Exception) -> int:
    return int(getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
