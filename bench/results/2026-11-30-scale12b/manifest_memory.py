import sys, time, tracemalloc, gc
from pathlib import Path
sys.path.insert(0, "tests")
from reembed.manifest import Manifest
from reembed.storage import Location
MODEL = {"name": "m", "revision": "r", "dimension": 4, "normalize": True, "pooling": "cls", "dtype": "float32",
         "max_seq_length": 16, "fingerprint": "f0"}
n = int(sys.argv[1]); out = Path(sys.argv[2])
loc = Location.from_uri(str(out))
if not (out / "manifest.json").exists():
    m = Manifest.create(loc, MODEL, {"shards": n, "rows": 5 * n}, {})
    rec = {"rows": 5, "dead_letters": 1, "reasons": {"duplicate_id": 1}, "truncated": 0, "tokens": 50, "bytes": 1234,
           "sha256": "0" * 64, "device_seconds": 0.01, "epoch": 1, "writer": {"node": "n" * 56, "host_pid": "h:1"},
           "dead_letter_bytes": 100, "dead_letter_sha256": "1"*64}
    t=time.time()
    for s in range(n):
        m.commit_shard(s, {**rec, "path": f"shards/part-{s:05d}.e0001.parquet", "dead_letter_path": f"dead_letter/part-{s:05d}.e0001.parquet"})
    print("commits", time.time()-t)
w = Manifest.load(loc); w.committed[1]; sum(1 for _ in w.committed.values()); del w
gc.collect()
tracemalloc.start()
m = Manifest.load(loc)
c = m.committed
print(len(c), n // 2 in c)
a = tracemalloc.get_traced_memory()[0]
r = c[n // 2]
b = tracemalloc.get_traced_memory()
print("held after load: %.1f B/shard; after one record: %.1f B/shard (peak %.1f)" % (a / n, b[0] / n, b[1] / n))
t = sum(x["rows"] for x in m.committed.values())
print("values sum", t, "held: %.1f B/shard" % (tracemalloc.get_traced_memory()[0] / n))
