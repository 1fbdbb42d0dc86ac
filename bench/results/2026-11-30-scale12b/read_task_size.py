import sys, tempfile
from pathlib import Path
import numpy as np, pyarrow as pa, pyarrow.parquet as pq
from ray import cloudpickle
from reembed.config import InputConfig
from reembed.plan import PLAN_DIR, make_plan
from reembed.read import ShardDatasource
from reembed.storage import Location
for shards in [int(x) for x in sys.argv[1].split(",")]:
    with tempfile.TemporaryDirectory() as d:
        d = Path(d); (d / "in").mkdir()
        pq.write_table(pa.table({"id": pa.array(np.char.add("d", np.arange(shards * 10).astype(str))), "text": pa.array(np.full(shards * 10, "x"))}), d / "in" / "docs.parquet", row_group_size=10_000)
        out = Location.from_uri(str(d / "out"))
        plan = make_plan(InputConfig(uri=str(d / "in")), 10, out.child(PLAN_DIR))
        tasks = ShardDatasource(plan, out, list(range(shards))).get_read_tasks(1)
        sizes = [len(cloudpickle.dumps(t)) for t in tasks]
        print(shards, "shards:", len(tasks), "tasks, bytes max", max(sizes), "min", min(sizes))
