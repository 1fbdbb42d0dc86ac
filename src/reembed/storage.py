"""URIs to pyarrow filesystems, listing, atomic publish, and the S3 client behind them.

Every URI pyarrow understands goes through the same code path: a local path or ``file://`` by default,
``s3://``, ``gs://``, ``abfs://`` and ``hdfs://`` alike. Credentials are never part of a URI, a config, a
log line or a pickled filesystem: pyarrow and boto3 read them from the standard AWS chain (environment,
shared profile, instance role, IRSA web identity) in whichever process opens the filesystem.

S3 gets more than the generic path:

- An endpoint override for S3-compatible stores (MinIO, Ceph, R2): ``storage.endpoint_url`` in the job
  config, else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` / the profile's ``endpoint_url``, as boto3
  resolves it. Region: ``storage.region``, else ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` / the profile,
  else the bucket's own region (``us-east-1`` on a custom endpoint).
- Reads stream through pyarrow (ranged GETs); listings page through ListObjectsV2, 1,000 keys a request;
  writes, deletes and conditional writes go through boto3, one request each.
- Retries with backoff on throttling, 5xx and dropped connections only (:data:`THROTTLING_CODES`); any
  other 4xx fails at once. pyarrow's own requests use the AWS SDK's standard strategy, which draws the
  same line.
- :func:`preflight` turns a missing bucket or prefix, denied access, rejected credentials or an
  unreachable endpoint into a one-line :class:`StorageError` before the job loads a model.

Settings (endpoint, region, retry attempts: never credentials) travel on each :class:`Location`, the way
Ray Data's datasinks carry theirs: a Location pickled into a Ray task brings them along, and nothing is
process-wide. The credentials come from the worker's own environment (a local Ray inherits the driver's)
or its node's role. On a remote cluster, give the nodes the variables or a role (IRSA on Kubernetes), or
name the endpoint with ``storage.endpoint_url``.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import os
import posixpath
import random
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
from reembed.errors import ObjectExistsError, StorageError, VersionConflict  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

_OBJECT_STORE_TYPES = {"s3", "gcs", "abfs"}

# S3 error codes that mean "slow down"; they are retried like any 5xx. Every other 4xx is final.
THROTTLING_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequests", "TooManyRequestsException", "RequestLimitExceeded",
    "BandwidthLimitExceeded", "ProvisionedThroughputExceededException",
})
_BACKOFF_BASE_S = 0.1
_BACKOFF_CAP_S = 10.0
_CONNECT_TIMEOUT_S = 10
_LIST_PAGE = 1000  # keys per ListObjectsV2 request (S3's maximum)
_READ_TIMEOUT_S = 120


@dataclass(frozen=True)
class Settings:
    """Where S3 is and how hard to retry: never credentials. Safe to pickle into Ray tasks."""

    endpoint_url: str | None = None
    region: str | None = None
    max_attempts: int = 8


    @classmethod
    def of(cls, cfg: Any = None) -> "Settings":
        """Settings from the job config's ``storage`` section (a ``config.StorageConfig``), a
        :class:`Settings`, or None for the defaults (boto3's own resolution of endpoint and region)."""
        if cfg is None:
            return cls()
        if isinstance(cfg, Settings):
            return cfg
        return cls(cfg.endpoint_url or None, cfg.region or None, max(1, int(cfg.max_attempts)))


@dataclass(frozen=True)
class Location:
    """A filesystem and a root path on it; ``uri`` is what the user typed (for messages)."""

    fs: pafs.FileSystem
    root: str
    uri: str
    settings: Settings = Settings()

    @classmethod
    def from_uri(cls, uri: str, settings: Any = None) -> "Location":
        """The location of ``uri``; ``settings`` (a :class:`Settings` or the job's ``StorageConfig``) say
        where S3 is. They travel with the Location, into Ray tasks too: there is no process-wide setting."""
        settings = Settings.of(settings)
        return cls(*resolve(uri, settings), uri=uri, settings=settings)

    def child(self, *parts: str) -> "Location":
        """The location of a sub-folder, with the same filesystem and settings."""
        return Location(self.fs, self.path(*parts), self.display(*parts), self.settings)

    @property
    def is_object_store(self) -> bool:
        return self.fs.type_name in _OBJECT_STORE_TYPES

    @property
    def conditional_writes(self) -> bool:
        """Whether :meth:`read_versioned` / :meth:`write_if` are available (S3 If-Match / If-None-Match)."""
        return self.fs.type_name == "s3"

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts) if parts else self.root

    def display(self, *parts: str) -> str:
        """A URI for messages: the user's URI with ``parts`` appended."""
        return posixpath.join(self.uri.rstrip("/"), *parts) if parts else self.uri

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def read_bytes(self, *parts: str) -> bytes:
        with self.fs.open_input_stream(self.path(*parts)) as f:
            return f.read()

    def size(self, *parts: str) -> int:
        return self.fs.get_file_info(self.path(*parts)).size

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Publish ``data`` at ``parts`` so that no reader ever sees it half-written.

        On a local or POSIX-like filesystem the bytes go to a temporary sibling that is then renamed over
        the target (atomic within one filesystem). An object store PUT is already all-or-nothing, so the
        object is written in place.
        """
        target = self.path(*parts)
        if self.fs.type_name == "s3":
            _s3_put(target, data, self.display(*parts), self.settings)
            return
        parent = posixpath.dirname(target)
        if parent:
            self.fs.create_dir(parent, recursive=True)
        if self.is_object_store:
            with self.fs.open_output_stream(target) as f:
                f.write(data)
            return
        tmp = f"{target}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            self.fs.move(tmp, target)
        except BaseException:
            _delete_quietly(self.fs, tmp)
            raise

    def publish(self, data: bytes, *parts: str, verify=None, exclusive: bool = False) -> None:
        """Write ``data`` at ``parts``, run ``verify(fs, path)`` on what was written, and leave nothing
        there if a check fails.

        Filesystems with rename: write under a temporary name in ``_tmp/`` beside the target, verify,
        move; a crash leaves only a temporary file, which :meth:`clean_tmp` removes on resume. S3 has no
        rename (and a copy of a large object costs as much as the write), but a PUT is atomic: the object
        goes straight to its final key, then its size and ``verify`` are checked, and it is deleted again
        if either fails. What it holds counts only once the caller records it (shards: in the manifest).
        ``exclusive`` makes the S3 PUT create-only (``If-None-Match: *``): an object already at the key,
        another job's, is never replaced; :class:`ObjectExistsError` says so.
        """
        target = self.path(*parts)
        if self.fs.type_name == "s3":
            _s3_put(target, data, self.display(*parts), self.settings, create_only=exclusive)
            try:
                written = self.fs.get_file_info(target).size
                if written != len(data):
                    raise StorageError(f"{self.display(*parts)}: stored {written} bytes of {len(data)}")
                if verify is not None:
                    verify(self.fs, target)
            except BaseException:
                _s3_delete(target, self.display(*parts), self.settings, quiet=True)
                raise
            return
        tmp_dir = posixpath.join(posixpath.dirname(target), "_tmp")
        tmp = posixpath.join(tmp_dir, f"{posixpath.basename(target)}.{uuid.uuid4().hex[:12]}")
        self.fs.create_dir(tmp_dir, recursive=True)
        try:
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            written = self.fs.get_file_info(tmp).size
            if written != len(data):
                raise StorageError(f"{self.display(*parts)}: wrote {written} bytes of {len(data)}")
            if verify is not None:
                verify(self.fs, tmp)
            self.fs.move(tmp, target)
        except BaseException:
            _delete_quietly(self.fs, tmp)
            raise

    def read_versioned(self, *parts: str) -> tuple[bytes, str] | None:
        """The object's bytes and its version tag (S3 ETag), read in one request; None if absent."""
        bucket, key = _split(self.path(*parts))
        try:
            resp = _s3_call("get_object", self.display(*parts), self.settings, Bucket=bucket, Key=key)
        except Exception as e:
            if _code(e) in ("NoSuchKey", "404"):
                return None
            raise explain(e, self.display(*parts), "read", self.settings) from e
        return resp["Body"].read(), resp["ETag"]

    def version(self, *parts: str) -> str | None:
        """The object's current version tag, or None if it does not exist."""
        bucket, key = _split(self.path(*parts))
        try:
            return _s3_call("head_object", self.display(*parts), self.settings, Bucket=bucket, Key=key)["ETag"]
        except Exception as e:
            if _code(e) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise explain(e, self.display(*parts), "check", self.settings) from e

    def write_if(self, data: bytes, *parts: str, version: str | None) -> str:
        """Write ``data`` only if the object is still at ``version`` (``If-Match``), or, with ``version``
        None, only if there is no object yet (``If-None-Match: *``). Returns the new version tag; raises
        :class:`VersionConflict` when someone else wrote first, and nothing is overwritten."""
        target = self.path(*parts)
        if version is None:
            return _s3_put(target, data, self.display(*parts), self.settings, create_only=True, conflict=VersionConflict)
        return _s3_put(target, data, self.display(*parts), self.settings, if_match=version, conflict=VersionConflict)

    def clean_tmp(self, *parts: str) -> int:
        """Remove temporary objects left in ``parts/_tmp/`` by a crashed attempt; returns how many."""
        leftovers = self.list(*parts, "_tmp", recursive=True)
        for info in leftovers:
            self.delete_path(info.path)
        return len(leftovers)

    def delete(self, *parts: str) -> None:
        self.delete_path(self.path(*parts))

    def delete_path(self, path: str) -> None:
        """Delete the file at ``path`` (a full path on this filesystem, as :meth:`list` returns); no error
        if it is already gone."""
        if self.fs.type_name == "s3":
            _s3_delete(path, _s3_uri(path), self.settings)
        else:
            _delete_quietly(self.fs, path)

    def delete_dir(self, *parts: str) -> None:
        path = self.path(*parts)
        if self.fs.type_name == "s3":
            _s3_delete_many([i.path for i in self.list(*parts, recursive=True)], self.display(*parts), self.settings)
            return
        if self.fs.get_file_info(path).type == pafs.FileType.Directory:
            self.fs.delete_dir(path)

    def list(self, *parts: str, recursive: bool = False) -> list[pafs.FileInfo]:
        """Files directly under ``parts`` (all levels if ``recursive``), sorted by path; none if missing."""
        if self.fs.type_name == "s3":
            return _s3_list(self.path(*parts), self.display(*parts), self.settings, recursive)
        sel = pafs.FileSelector(self.path(*parts), recursive=recursive, allow_not_found=True)
        infos = self.fs.get_file_info(sel)
        return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)


def json_lines(data: bytes, where: str, error: type[Exception] = ValueError):
    """Yield (line number, object) for each non-blank line of a JSON Lines file (gzip when ``where``
    ends in .gz). A line that is not a JSON object raises ``error`` naming ``where:line``."""
    import gzip
    import json

    if where.endswith(".gz"):
        data = gzip.decompress(data)
    for n, line in enumerate(data.decode().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise error(f"{where}:{n}: not valid JSON ({e})") from e
        if not isinstance(obj, dict):
            raise error(f"{where}:{n}: expected a JSON object per line")
        yield n, obj


def resolve(uri: str, settings: Settings | None = None) -> tuple[pafs.FileSystem, str]:
    """Map a URI or local path to (filesystem, path)."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    if uri.startswith("s3://"):
        path = uri[len("s3://"):].split("?", 1)[0].rstrip("/")
        bucket = path.split("/", 1)[0]
        if not bucket:
            raise StorageError(f"{uri}: no bucket in this URI (expected s3://BUCKET/PREFIX)")
        return _s3(bucket, settings or Settings()).fs, path
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as e:  # ArrowInvalid (a ValueError) for an unknown scheme
        raise StorageError(f"{uri}: cannot open this URI ({e})") from e
    return fs, path.rstrip("/") or path


def list_inputs(uri: str, pattern: str = "*", settings: Any = None) -> tuple[Location, list[pafs.FileInfo]]:
    """The input files under ``uri``: a single file, a folder (recursively, filtered by ``pattern``),
    or a glob in the last path component (``s3://b/docs/*.parquet``)."""
    base_uri, glob = _split_glob(uri)
    loc = Location.from_uri(base_uri, settings)
    try:
        info = loc.fs.get_file_info(loc.root)
    except OSError as e:
        raise explain(e, uri, "list", loc.settings) from e
    if info.type == pafs.FileType.File and glob is None:
        return loc, [info]
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{uri}: input not found (no such file, folder or prefix)")
    try:
        files = loc.list(recursive=True)
    except OSError as e:
        raise explain(e, uri, "list", loc.settings) from e
    match = glob or pattern
    picked = [
        f for f in files
        if fnmatch.fnmatch(posixpath.basename(f.path), match)
        and not posixpath.basename(f.path).startswith((".", "_"))
    ]
    if not picked:
        raise StorageError(f"{uri}: no input files match {match!r}")
    return loc, picked


def preflight(input_uri: str, output_uri: str, settings: Any = None) -> None:
    """Check, in a few requests and before any model or GPU work, that the input can be listed and the
    output written; raise a one-line :class:`StorageError` naming the URI and the likely cause."""
    t0 = time.monotonic()
    settings = Settings.of(settings)
    _check_input(input_uri, settings)
    _check_output(output_uri, settings)
    log.debug("preflight: input and output reachable (%.2f s)", time.monotonic() - t0)


def explain(e: BaseException, uri: str, action: str, settings: Settings | None = None) -> StorageError:
    """Turn a boto3 or pyarrow storage error into a one-line :class:`StorageError` with the likely cause."""
    if isinstance(e, StorageError):
        return e
    code = _code(e)
    where = _endpoint_words(uri, settings or Settings())
    bucket = uri[len("s3://"):].split("/", 1)[0] if uri.startswith("s3://") else ""
    if code in ("NoSuchBucket", "NO_SUCH_BUCKET"):
        cause = f"bucket {bucket!r} does not exist on {where} (check the bucket name and the endpoint)"
    elif code in ("InvalidAccessKeyId", "INVALID_ACCESS_KEY_ID", "InvalidClientTokenId"):
        cause = (f"{where} does not recognise the access key id (wrong or deleted credentials: check "
                 "AWS_ACCESS_KEY_ID / AWS_PROFILE)")
    elif code in ("SignatureDoesNotMatch", "SIGNATURE_DOES_NOT_MATCH"):
        cause = ("the secret access key does not match the access key id (wrong credentials: check "
                 "AWS_SECRET_ACCESS_KEY / AWS_PROFILE)")
    elif code in ("ExpiredToken", "InvalidToken", "TokenRefreshRequired", "EXPIRED_TOKEN", "RequestExpired"):
        cause = "the session token is expired or invalid (refresh the credentials)"
    elif code in ("AccessDenied", "ACCESS_DENIED", "Forbidden", "403", "AllAccessDisabled"):
        perm = {"list": "s3:ListBucket", "read": "s3:GetObject", "write": "s3:PutObject",
                "delete": "s3:DeleteObject", "check": "s3:GetObject / s3:ListBucket"}.get(action, "access")
        cause = f"access denied to {action} (the credentials in use lack {perm} here: check the IAM and bucket policies)"
    elif code in ("PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException", "301"):
        cause = "the bucket is in another region (set AWS_REGION or storage.region)"
    elif code in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
        cause = ("no usable AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
                 "AWS_PROFILE, or run with an instance role / IRSA)")
    elif code in ("EndpointConnectionError", "ConnectTimeoutError", "NETWORK_CONNECTION", "ProxyConnectionError"):
        cause = f"cannot connect to {where} (check the URL and that the server is running and reachable)"
    elif code in ("SSLError",):
        cause = f"TLS handshake with {where} failed (http vs https, or an untrusted certificate)"
    elif code and code.isdigit():
        cause = f"{where} answered HTTP {code} without an S3 error code (is it an S3 endpoint?)"
    else:
        detail = " ".join(str(e).split())
        cause = f"{action} failed: {code + ': ' if code else ''}{detail[:300]}"
    return StorageError(f"{uri}: {cause}")


# -- S3 -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _S3:
    fs: pafs.S3FileSystem
    client: Any  # boto3 S3 client with botocore's own retries off: _s3_call retries
    endpoint_source: str | None  # which setting named a custom endpoint; None on AWS itself
    region: str
    max_attempts: int


def _s3(bucket: str, settings: Settings) -> _S3:
    return _connect_s3(bucket, settings, _aws_environment())


def _aws_environment() -> tuple[tuple[str, str], ...]:
    # Part of the cache key so a changed environment (tests, credential rotation by env) takes effect.
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))


@functools.lru_cache(maxsize=32)
def _connect_s3(bucket: str, cfg: Settings, _env: tuple) -> _S3:
    import boto3
    import botocore.session
    from botocore.config import Config

    core = botocore.session.Session()
    session = boto3.session.Session(botocore_session=core)
    endpoint, source = _endpoint(cfg, core)
    region = cfg.region or os.environ.get("AWS_REGION") or session.region_name
    if not region:
        region = "us-east-1" if endpoint else _bucket_region(bucket)
    client = session.client(
        "s3", region_name=region, endpoint_url=endpoint,
        config=Config(
            retries={"total_max_attempts": 1},
            connect_timeout=_CONNECT_TIMEOUT_S, read_timeout=_READ_TIMEOUT_S,
            # S3-compatible stores address buckets by path; pyarrow does the same with an endpoint override.
            s3={"addressing_style": "path"} if endpoint else None,
        ),
    )
    fs_kwargs: dict[str, Any] = {}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        fs_kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme)
    # No credentials are passed: pyarrow's AWS SDK reads the same chain as boto3 in whichever process
    # unpickles or builds this filesystem, so none ever sits in a pickled task. Its standard retry strategy
    # retries throttling, 5xx and network errors, not other 4xx (one known gap, in the SDK: a ranged GET
    # shorter than the error document S3 sends back fails without a retry).
    fs = pafs.S3FileSystem(
        region=region, connect_timeout=_CONNECT_TIMEOUT_S, request_timeout=_READ_TIMEOUT_S,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=cfg.max_attempts), **fs_kwargs,
    )
    return _S3(fs=fs, client=client, endpoint_source=source, region=region, max_attempts=cfg.max_attempts)


def _endpoint(cfg: Settings, core) -> tuple[str | None, str | None]:
    """The custom S3 endpoint and the setting it came from, in boto3's order of precedence."""
    if cfg.endpoint_url:
        return cfg.endpoint_url, "storage.endpoint_url"
    if os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true":
        return None, None
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(var):
            return os.environ[var], var
    scoped = core.get_scoped_config()
    services = core.full_config.get("services", {}).get(scoped.get("services", ""), {})
    if services.get("s3", {}).get("endpoint_url"):
        return services["s3"]["endpoint_url"], "the AWS profile's services s3 endpoint_url"
    if scoped.get("endpoint_url"):
        return scoped["endpoint_url"], "the AWS profile's endpoint_url"
    return None, None


def _bucket_region(bucket: str) -> str:
    try:
        return pafs.resolve_s3_region(bucket)
    except (OSError, ValueError) as e:
        log.debug("cannot resolve the region of bucket %s (%s); using us-east-1", bucket, e)
        return "us-east-1"


def _s3_call(op: str, uri: str, settings: Settings, attempts: int | None = None, **kwargs) -> Any:
    """One boto3 S3 call, retried with exponential backoff and jitter on throttling, 5xx and dropped
    connections; anything else (every other 4xx included) is raised at once. The exception raised carries
    ``attempts``, how many requests were made."""
    s3 = _s3(kwargs["Bucket"], settings)
    call = getattr(s3.client, op)
    limit = attempts or s3.max_attempts
    for attempt in range(1, limit + 1):
        try:
            return call(**kwargs)
        except Exception as e:
            if attempt >= limit or not _retryable(e):
                e.attempts = attempt  # type: ignore[attr-defined]
                raise
            step = min(_BACKOFF_CAP_S, _BACKOFF_BASE_S * 2 ** (attempt - 1))
            delay = step / 2 + random.uniform(0, step / 2)
            log.warning("%s %s: %s; retry %d of %d in %.2f s", op, uri, _code(e) or type(e).__name__,
                        attempt, limit - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def _retryable(e: BaseException) -> bool:
    from botocore.exceptions import (ClientError, ConnectionClosedError, ConnectTimeoutError,
                                     EndpointConnectionError, ReadTimeoutError, ResponseStreamingError)

    if isinstance(e, ClientError):
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return status >= 500 or status == 429 or _code(e) in THROTTLING_CODES
    return isinstance(e, (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError,
                          ResponseStreamingError))


def _code(e: BaseException) -> str:
    """An S3 error code (``NoSuchBucket``), a pyarrow AWS error name (``ACCESS_DENIED``), or the botocore
    exception class name; '' if none applies."""
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        err = response.get("Error", {})
        return str(err.get("Code") or response.get("ResponseMetadata", {}).get("HTTPStatusCode") or "")
    if type(e).__module__.startswith("botocore"):
        return type(e).__name__
    m = re.search(r"AWS Error ([A-Z_]+)", str(e))
    return m.group(1) if m else ""


def _split(path: str) -> tuple[str, str]:
    bucket, _, key = path.partition("/")
    return bucket, key


def _s3_uri(path: str) -> str:
    return f"s3://{path}"


def _s3_put(path: str, data: bytes, uri: str, settings: Settings, create_only: bool = False, if_match: str | None = None,
            conflict: type[StorageError] = ObjectExistsError) -> str:
    """PUT ``data`` at ``path`` (optionally create-only or If-Match); returns the new ETag.

    A retried conditional PUT can meet its own first attempt, which landed although its answer was lost:
    the 412 it then gets is checked against the stored bytes before it counts as a conflict.
    """
    bucket, key = _split(path)
    cond = {"IfNoneMatch": "*"} if create_only else {"IfMatch": if_match} if if_match else {}
    try:
        return _s3_call("put_object", uri, settings, Bucket=bucket, Key=key, Body=data, **cond)["ETag"]
    except Exception as e:
        if _code(e) not in ("PreconditionFailed", "412", "ConditionalRequestConflict") or not cond:
            raise explain(e, uri, "write", settings) from e
        if getattr(e, "attempts", 1) > 1:
            mine = _s3_own_write(bucket, key, data, uri, settings)
            if mine:
                return mine
        what = "an object already exists here" if create_only else "the object changed since it was read"
        raise conflict(f"{uri}: {what}: another job is writing this output at the same time") from e


def _s3_own_write(bucket: str, key: str, data: bytes, uri: str, settings: Settings) -> str | None:
    """The ETag of the object at ``key`` if it holds exactly ``data``, else None."""
    try:
        resp = _s3_call("get_object", uri, settings, Bucket=bucket, Key=key)
        return resp["ETag"] if resp["Body"].read() == data else None
    except Exception:
        return None


def _s3_delete(path: str, uri: str, settings: Settings, quiet: bool = False) -> None:
    bucket, key = _split(path)
    try:
        _s3_call("delete_object", uri, settings, Bucket=bucket, Key=key)
    except Exception as e:
        if quiet:
            log.warning("%s: could not delete (%s)", uri, _code(e) or e)
            return
        raise explain(e, uri, "delete", settings) from e


def _s3_delete_many(paths: list[str], uri: str, settings: Settings) -> None:
    """Delete objects 1,000 per request (DeleteObjects)."""
    for i in range(0, len(paths), 1000):
        batch = paths[i:i + 1000]
        bucket = _split(batch[0])[0]
        objects = [{"Key": _split(p)[1]} for p in batch]
        try:
            resp = _s3_call("delete_objects", uri, settings, Bucket=bucket, Delete={"Objects": objects, "Quiet": True})
        except Exception as e:
            raise explain(e, uri, "delete", settings) from e
        if resp.get("Errors"):
            err = resp["Errors"][0]
            raise StorageError(f"s3://{bucket}/{err['Key']}: delete failed: {err.get('Code')}: {err.get('Message')}")


def _s3_list(path: str, uri: str, settings: Settings, recursive: bool) -> list[pafs.FileInfo]:
    """Objects under the prefix ``path``, 1,000 per request (ListObjectsV2 pages), sorted by path."""
    bucket, key = _split(path)
    prefix = f"{key.rstrip('/')}/" if key else ""
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": _LIST_PAGE}
    if not recursive:
        kwargs["Delimiter"] = "/"
    out = []
    while True:
        try:
            page = _s3_call("list_objects_v2", uri, settings, **kwargs)
        except Exception as e:
            raise explain(e, uri, "list", settings) from e
        for obj in page.get("Contents", []):
            if not obj["Key"].endswith("/"):  # folder markers some tools create
                out.append(pafs.FileInfo(f"{bucket}/{obj['Key']}", pafs.FileType.File, size=obj["Size"],
                                         mtime=obj["LastModified"]))
        if not page.get("IsTruncated"):
            break
        kwargs["ContinuationToken"] = page["NextContinuationToken"]
    return sorted(out, key=lambda i: i.path)


def _endpoint_words(uri: str, settings: Settings) -> str:
    """How messages name the server: the setting that chose it, never its value (which may be private)."""
    if not uri.startswith("s3://"):
        return "the storage service"
    try:
        source = _s3(uri[len("s3://"):].split("/", 1)[0], settings).endpoint_source
    except Exception:
        source = None
    return f"the S3 endpoint set by {source}" if source else "AWS S3"


# -- preflight ----------------------------------------------------------------------------------------


def _check_input(uri: str, settings: Settings) -> None:
    base_uri, _ = _split_glob(uri)
    loc = Location.from_uri(base_uri, settings)
    if loc.fs.type_name != "s3":
        try:
            info = loc.fs.get_file_info(loc.root)
        except OSError as e:
            raise explain(e, uri, "list", settings) from e
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"{uri}: input not found (no such file, folder or prefix)")
        return
    bucket, key = _split(loc.root)
    prefix = f"{key}/" if key else ""
    try:
        page = _s3_call("list_objects_v2", uri, settings, attempts=min(3, settings.max_attempts),
                        Bucket=bucket, Prefix=prefix, MaxKeys=1)
    except Exception as e:
        raise explain(e, uri, "list", settings) from e
    if page.get("KeyCount", 0):
        return
    if not key:
        raise StorageError(f"{uri}: bucket {bucket!r} is empty; no input to read")
    try:
        _s3_call("head_object", uri, settings, Bucket=bucket, Key=key)
    except Exception as e:
        if _code(e) in ("404", "NoSuchKey", "NotFound"):
            raise StorageError(f"{uri}: no object or prefix {key!r} in bucket {bucket!r} (check the path; "
                               "S3 keys are case-sensitive)") from e
        raise explain(e, uri, "read", settings) from e


def _check_output(uri: str, settings: Settings) -> None:
    loc = Location.from_uri(uri, settings)
    if loc.fs.type_name != "s3":
        return
    bucket, key = _split(loc.root)
    attempts = min(3, settings.max_attempts)
    try:
        _s3_call("list_objects_v2", uri, settings, attempts=attempts, Bucket=bucket, Prefix=f"{key}/" if key else "", MaxKeys=1)
    except Exception as e:
        raise explain(e, uri, "list", settings) from e
    probe = posixpath.join(key, f".reembed-write-check-{uuid.uuid4().hex[:12]}")
    try:
        _s3_call("put_object", uri, settings, attempts=attempts, Bucket=bucket, Key=probe, Body=b"")
    except Exception as e:
        raise explain(e, uri, "write", settings) from e
    try:
        _s3_call("delete_object", uri, settings, attempts=attempts, Bucket=bucket, Key=probe)
    except Exception as e:
        raise explain(e, uri, "delete", settings) from e


def _split_glob(uri: str) -> tuple[str, str | None]:
    head, tail = posixpath.split(uri.rstrip("/"))
    if any(c in tail for c in "*?["):
        return head, tail
    return uri, None


def _delete_quietly(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except (FileNotFoundError, OSError):
        pass

