"""S3 behind every ``s3://`` Location: one boto3 client per bucket and settings, retries at the I/O edge,
conditional writes, paginated listing, and :func:`explain`, which turns a storage failure into one line.

Credentials are never passed, logged or pickled: boto3 and pyarrow read the standard AWS chain in whichever
process opens the filesystem.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import re
import time
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from reembed.errors import ObjectExistsError, StorageError

log = logging.getLogger(__name__)

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
