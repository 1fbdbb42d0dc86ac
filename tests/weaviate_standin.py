"""A stand-in Weaviate (REST on one port, gRPC on another, 127.0.0.1) for the official v4 client.

Weaviate's embedded mode downloads a server binary at run time (impossible offline), and no real server was
reachable to record an exchange from. So this serves what the client does during a publish, written from
Weaviate's REST API and the client's own protobuf definitions (``weaviate.proto.v1``): the start-up checks
(``GET /v1/meta``, OIDC discovery, gRPC health), ``GET/POST /v1/schema``, gRPC ``BatchObjects``, and the
aggregate count through ``POST /v1/graphql`` (the client's path for servers before 1.29; this one says 1.28).
Objects are kept in memory so a test can check what the client sent.
"""

from __future__ import annotations

import json
import re
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

VERSION = "1.28.0"


class WeaviateStandin:
    def __init__(self):
        import grpc
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        from weaviate.proto.v1 import weaviate_pb2_grpc

        self.classes: dict[str, dict] = {}
        self.objects: dict[str, dict[str, dict]] = {}  # collection -> uuid -> {"properties", "vector"}
        self.batches: list[int] = []
        self.lock = threading.Lock()
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), self._rest())
        self.grpc = grpc.server(ThreadPoolExecutor(max_workers=4))
        weaviate_pb2_grpc.add_WeaviateServicer_to_server(self._servicer(), self.grpc)
        status = health.HealthServicer()
        status.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(status, self.grpc)
        self.grpc_port = self.grpc.add_insecure_port("127.0.0.1:0")
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)

    @property
    def http_port(self) -> int:
        return self.http.server_address[1]

    def __enter__(self) -> "WeaviateStandin":
        self.grpc.start()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.http.shutdown()
        self.http.server_close()
        self.grpc.stop(grace=None)

    # -- gRPC: BatchObjects ----------------------------------------------------------------------

    def _servicer(self):
        from google.protobuf.json_format import MessageToDict
        from weaviate.proto.v1 import batch_pb2, weaviate_pb2_grpc

        standin = self

        class Servicer(weaviate_pb2_grpc.WeaviateServicer):
            def BatchObjects(self, request, context):
                errors = []
                with standin.lock:
                    for n, obj in enumerate(request.objects):
                        if obj.collection not in standin.classes:
                            errors.append(batch_pb2.BatchObjectsReply.BatchError(
                                index=n, error=f"class {obj.collection} does not exist"))
                            continue
                        props = MessageToDict(obj.properties.non_ref_properties)
                        for arr in obj.properties.text_array_properties:
                            props[arr.prop_name] = list(arr.values)
                        raw = obj.vectors[0].vector_bytes if obj.vectors else obj.vector_bytes
                        vector = list(struct.unpack(f"<{len(raw) // 4}f", raw)) if raw else list(obj.vector)
                        standin.objects.setdefault(obj.collection, {})[obj.uuid] = {"properties": props, "vector": vector}
                    standin.batches.append(len(request.objects))
                return batch_pb2.BatchObjectsReply(took=0.001, errors=errors)

        return Servicer()

    # -- REST ------------------------------------------------------------------------------------

    def _rest(self):
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, code: int, body) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                path = urlsplit(self.path).path
                if path == "/v1/meta":
                    return self._reply(200, {"hostname": "http://[::]:8080", "modules": {}, "version": VERSION})
                if path == "/v1/.well-known/ready":
                    return self._reply(200, {})
                with standin.lock:
                    if path == "/v1/schema":
                        return self._reply(200, {"classes": list(standin.classes.values())})
                    m = re.fullmatch(r"/v1/schema/([^/]+)", path)
                    if m:
                        cls = standin.classes.get(m.group(1))
                        return self._reply(200, cls) if cls else self._reply(404, {"error": [{"message": "not found"}]})
                self._reply(404, {"error": [{"message": f"no route {path}"}]})

            def do_POST(self):
                path = urlsplit(self.path).path
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                with standin.lock:
                    if path == "/v1/schema":
                        name = body["class"]
                        if name in standin.classes:
                            return self._reply(422, {"error": [{"message": f"class name {name!r} already exists"}]})
                        standin.classes[name] = _completed(body)
                        return self._reply(200, standin.classes[name])
                    if path == "/v1/graphql":
                        m = re.search(r"Aggregate\s*{\s*(\w+)", body.get("query", ""))
                        if m:
                            n = len(standin.objects.get(m.group(1), {}))
                            return self._reply(200, {"data": {"Aggregate": {m.group(1): [{"meta": {"count": n}}]}}})
                self._reply(404, {"error": [{"message": f"no route {path}"}]})

        return Handler


def _completed(cls: dict) -> dict:
    """A class as the server returns it: what was posted plus the defaults the server fills in."""
    out = {"properties": [], "invertedIndexConfig": {"bm25": {"b": 0.75, "k1": 1.2}, "cleanupIntervalSeconds": 60,
                                                     "stopwords": {"preset": "en", "additions": None, "removals": None}},
           "multiTenancyConfig": {"enabled": False, "autoTenantCreation": False, "autoTenantActivation": False},
           "replicationConfig": {"factor": 1, "asyncEnabled": False, "deletionStrategy": "NoAutomatedResolution"},
           "shardingConfig": {"virtualPerPhysical": 128, "desiredCount": 1, "actualCount": 1, "desiredVirtualCount": 128,
                              "actualVirtualCount": 128, "key": "_id", "strategy": "hash", "function": "murmur3"},
           "vectorizer": "none", **cls}
    for named in (out.get("vectorConfig") or {}).values():
        named["vectorIndexConfig"] = {**HNSW_DEFAULTS, **(named.get("vectorIndexConfig") or {})}
    if out.get("vectorIndexType") == "hnsw" or "vectorConfig" not in out:
        out["vectorIndexType"] = "hnsw"
        out["vectorIndexConfig"] = {**HNSW_DEFAULTS, **(out.get("vectorIndexConfig") or {})}
    return out


# Weaviate 1.28's HNSW defaults, as it returns them in a class's schema.
HNSW_DEFAULTS = {"skip": False, "cleanupIntervalSeconds": 300, "maxConnections": 32, "efConstruction": 128, "ef": -1,
                 "dynamicEfMin": 100, "dynamicEfMax": 500, "dynamicEfFactor": 8, "vectorCacheMaxObjects": 1000000000000,
                 "flatSearchCutoff": 40000, "distance": "cosine", "filterStrategy": "sweeping",
                 "pq": {"enabled": False, "bitCompression": False, "segments": 0, "centroids": 256, "trainingLimit": 100000,
                        "encoder": {"type": "kmeans", "distribution": "log-normal"}},
                 "bq": {"enabled": False}, "sq": {"enabled": False, "trainingLimit": 100000, "rescoreLimit": 20},
                 "multivector": {"enabled": False, "aggregation": "maxSim"}}
