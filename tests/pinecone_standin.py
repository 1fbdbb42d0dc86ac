"""A stand-in for one Pinecone index's data plane, served over HTTP on 127.0.0.1 for the official client.

Pinecone has no local or in-memory mode the client can use here (Pinecone Local is a Docker image), and no
real index was reachable to record an exchange from, so this serves the four REST endpoints reembed uses,
written from Pinecone's API reference: ``POST /vectors/upsert``, ``POST /describe_index_stats``,
``GET /vectors/fetch``, ``GET /vectors/list`` (camelCase JSON, ``Api-Key`` header required). It keeps the
vectors in memory so a test can check what the client sent, and logs every request.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


class PineconeStandin:
    def __init__(self, dimension: int, api_key: str = "test-key"):
        self.dimension, self.api_key = dimension, api_key
        self.namespaces: dict[str, dict[str, dict]] = {}
        self.requests: list[tuple[str, str, int]] = []  # (method, path, number of vectors)
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "PineconeStandin":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _reply(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self) -> bool:
                if self.headers.get("Api-Key") != standin.api_key:
                    self._reply(401, {"error": {"code": "UNAUTHENTICATED", "message": "Invalid API Key"}, "status": 401})
                    return False
                return True

            def do_POST(self):
                if not self._authorized():
                    return
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                path = urlsplit(self.path).path
                with standin.lock:
                    if path == "/vectors/upsert":
                        ns = standin.namespaces.setdefault(body.get("namespace", ""), {})
                        for v in body["vectors"]:
                            if len(v["values"]) != standin.dimension:
                                standin.requests.append(("POST", path, 0))
                                return self._reply(400, {"code": 3, "message": f"Vector dimension {len(v['values'])} "
                                                         f"does not match the dimension of the index {standin.dimension}"})
                            ns[v["id"]] = {"id": v["id"], "values": v["values"], **({"metadata": v["metadata"]} if "metadata" in v else {})}
                        standin.requests.append(("POST", path, len(body["vectors"])))
                        return self._reply(200, {"upsertedCount": len(body["vectors"])})
                    if path == "/describe_index_stats":
                        standin.requests.append(("POST", path, 0))
                        spaces = {name or "__default__": {"vectorCount": len(v)} for name, v in standin.namespaces.items()}
                        return self._reply(200, {"namespaces": spaces, "dimension": standin.dimension, "indexFullness": 0.0,
                                                 "totalVectorCount": sum(len(v) for v in standin.namespaces.values())})
                self._reply(404, {"message": f"no route {path}"})

            def do_GET(self):
                if not self._authorized():
                    return
                parts = urlsplit(self.path)
                q = parse_qs(parts.query)
                ns_name = q.get("namespace", [""])[0]
                with standin.lock:
                    ns = standin.namespaces.get(ns_name, {})
                    standin.requests.append(("GET", parts.path, 0))
                    if parts.path == "/vectors/fetch":
                        found = {i: ns[i] for i in q.get("ids", []) if i in ns}
                        return self._reply(200, {"vectors": found, "namespace": ns_name, "usage": {"readUnits": 1}})
                    if parts.path == "/vectors/list":
                        ids = sorted(ns)
                        start = int(q.get("paginationToken", ["0"])[0])
                        limit = int(q.get("limit", ["100"])[0])
                        page = ids[start:start + limit]
                        body = {"vectors": [{"id": i} for i in page], "namespace": ns_name, "usage": {"readUnits": 1}}
                        if start + limit < len(ids):
                            body["pagination"] = {"next": str(start + limit)}
                        return self._reply(200, body)
                self._reply(404, {"message": f"no route {parts.path}"})

        return Handler
