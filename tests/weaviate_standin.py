"""A stand-in Weaviate (REST on one port, gRPC on another, 127.0.0.1) for the official v4 client.

Weaviate's embedded mode downloads a server binary at run time (impossible offline), and no real server was
reachable to record an exchange from. So this serves what the client does during a publish, written from
Weaviate's REST API and the client's own protobuf definitions (``weaviate.proto.v1``): the start-up checks
(``GET /v1/meta``, OIDC discovery, gRPC health), ``GET/POST /v1/schema``, gRPC ``BatchObjects``, and the
aggregate count through ``POST /v1/graphql`` (the client's path for servers before 1.29; this one says 1.28).
Objects are kept in memory so a test can check what the client sent.

``WeaviateStandin(version="1.32.0")`` plays a server with collection aliases (Weaviate >= 1.32), written from
Weaviate's REST reference for ``/v1/aliases`` (list, get, create, replace, delete; an alias may not take a
collection's name, nor a collection an alias's) and from what the pinned client sends (weaviate-client 4.16's
``client.alias``); the count then goes through gRPC ``Aggregate`` as the client does from 1.29 on, and an
alias name is resolved wherever a collection name is taken. It is a stand-in, not Weaviate: nothing here was
checked against a real server.
"""

from __future__ import annotations

import json
import re
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

VERSION = "1.28.0"


class WeaviateStandin:
    def __init__(self, version: str = VERSION):
        import grpc
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        from weaviate.proto.v1 import weaviate_pb2_grpc

        self.version = version
        self.classes: dict[str, dict] = {}
        self.aliases: dict[str, str] = {}  # alias -> collection
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
    def has_aliases(self) -> bool:
        return tuple(int(x) for x in self.version.split(".")[:2]) >= (1, 32)

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
                        collection = standin.aliases.get(obj.collection, obj.collection)
                        if collection not in standin.classes:
                            errors.append(batch_pb2.BatchObjectsReply.BatchError(
                                index=n, error=f"class {obj.collection} does not exist"))
                            continue
                        props = MessageToDict(obj.properties.non_ref_properties)
                        for arr in obj.properties.text_array_properties:
                            props[arr.prop_name] = list(arr.values)
                        raw = obj.vectors[0].vector_bytes if obj.vectors else obj.vector_bytes
                        vector = list(struct.unpack(f"<{len(raw) // 4}f", raw)) if raw else list(obj.vector)
                        standin.objects.setdefault(collection, {})[obj.uuid] = {"properties": props, "vector": vector}
                    standin.batches.append(len(request.objects))
                return batch_pb2.BatchObjectsReply(took=0.001, errors=errors)

            def Aggregate(self, request, context):  # the total count only (what a publish asks)
                from weaviate.proto.v1 import aggregate_pb2

                with standin.lock:
                    collection = standin.aliases.get(request.collection, request.collection)
                    n = len(standin.objects.get(collection, {}))
                return aggregate_pb2.AggregateReply(took=0.001, single_result=aggregate_pb2.AggregateReply.Single(
                    objects_count=n))

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
                    return self._reply(200, {"hostname": "http://[::]:8080", "modules": {}, "version": standin.version})
                if path == "/v1/.well-known/ready":
                    return self._reply(200, {})
                with standin.lock:
                    if path == "/v1/schema":
                        return self._reply(200, {"classes": list(standin.classes.values())})
                    m = re.fullmatch(r"/v1/schema/([^/]+)", path)
                    if m:
                        cls = standin.classes.get(m.group(1))
                        return self._reply(200, cls) if cls else self._reply(404, {"error": [{"message": "not found"}]})
                    if standin.has_aliases and path == "/v1/aliases":
                        only = dict(parse_qsl(urlsplit(self.path).query)).get("class")
                        return self._reply(200, {"aliases": [{"alias": a, "class": c} for a, c in
                                                             sorted(standin.aliases.items()) if only in (None, c)]})
                    m = re.fullmatch(r"/v1/aliases/([^/]+)", path)
                    if standin.has_aliases and m:
                        if m.group(1) not in standin.aliases:
                            return self._reply(404, {"error": [{"message": f"alias {m.group(1)} not found"}]})
                        return self._reply(200, {"alias": m.group(1), "class": standin.aliases[m.group(1)]})
                self._reply(404, {"error": [{"message": f"no route {path}"}]})

            def do_PUT(self):
                path = urlsplit(self.path).path
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                m = re.fullmatch(r"/v1/aliases/([^/]+)", path)
                with standin.lock:
                    if standin.has_aliases and m:
                        alias, target = m.group(1), body.get("class")
                        if alias not in standin.aliases:
                            return self._reply(404, {"error": [{"message": f"alias {alias} not found"}]})
                        if target not in standin.classes:
                            return self._reply(422, {"error": [{"message": f"class {target} does not exist"}]})
                        standin.aliases[alias] = target  # one assignment: a reader sees the old or the new target
                        return self._reply(200, {"alias": alias, "class": target})
                self._reply(404, {"error": [{"message": f"no route {path}"}]})

            def do_DELETE(self):
                path = urlsplit(self.path).path
                m = re.fullmatch(r"/v1/aliases/([^/]+)", path)
                with standin.lock:
                    if standin.has_aliases and m:
                        if standin.aliases.pop(m.group(1), None) is None:
                            return self._reply(404, {"error": [{"message": f"alias {m.group(1)} not found"}]})
                        self.send_response(204)
                        self.end_headers()
                        return
                self._reply(404, {"error": [{"message": f"no route {path}"}]})

            def do_POST(self):
                path = urlsplit(self.path).path
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                with standin.lock:
                    if standin.has_aliases and path == "/v1/aliases":
                        alias, target = body.get("alias"), body.get("class")
                        if alias in standin.aliases or alias in standin.classes:
                            return self._reply(422, {"error": [{"message": f"alias {alias} already exists"}]})
                        if target not in standin.classes:
                            return self._reply(422, {"error": [{"message": f"class {target} does not exist"}]})
                        standin.aliases[alias] = target
                        return self._reply(200, {"alias": alias, "class": target})
                    if path == "/v1/schema":
                        name = body["class"]
                        if name in standin.classes or name in standin.aliases:
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
