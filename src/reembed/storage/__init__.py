"""URIs to pyarrow filesystems, listing, atomic publish, and the S3 client behind them.

* :mod:`reembed.storage.location` - :class:`Location` (settings travel on it), ``resolve``.
* :mod:`reembed.storage.s3` - the S3 client, retries, conditional writes, :func:`explain`.
* :mod:`reembed.storage.inputs` - ``list_inputs`` and ``preflight``.
* :mod:`reembed.storage.jsonl` - the one JSON Lines reader.

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

from reembed.errors import ObjectExistsError, StorageError, VersionConflict
from reembed.storage.inputs import list_inputs, preflight
from reembed.storage.jsonl import json_lines
from reembed.storage.location import Location, resolve
from reembed.storage.s3 import THROTTLING_CODES, Settings, explain

__all__ = ["Location", "Settings", "resolve", "list_inputs", "preflight", "explain", "json_lines",
           "THROTTLING_CODES", "StorageError", "ObjectExistsError", "VersionConflict"]
