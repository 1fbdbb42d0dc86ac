import os, sys, time, shutil
from pathlib import Path
import pyarrow as pa
from reembed.config import InputConfig
from reembed.plan import make_plan
from reembed.storage import Location
os.sched_setaffinity(0, {0}); pa.set_cpu_count(1); pa.set_io_thread_count(1)
root = Path("/tmp/s12b/corpus"); n = 1_000_000
for fmt in sys.argv[1].split(","):
    for P in [int(x) for x in sys.argv[2].split(",")]:
        best = 1e9
        for _ in range(int(sys.argv[3]) if len(sys.argv) > 3 else 1):
            work = root.parent / "_plans" / fmt
            shutil.rmtree(work, ignore_errors=True)
            c = time.process_time(); t = time.perf_counter()
            plan = make_plan(InputConfig(uri=str(root), format=fmt, pattern=f"*.{fmt}"), 10_000, Location.from_uri(str(work)), partitions=P)
            best = min(best, time.process_time() - c)
        print(f"{fmt} P={P}: {n/best:,.0f} docs/CPU-s ({best:.2f} CPU-s, {time.perf_counter()-t:.1f} s wall) dups={plan['duplicate_rows']} load={os.getloadavg()[0]:.0f}", flush=True)
