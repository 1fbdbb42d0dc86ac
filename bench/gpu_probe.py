"""Where the GPU time goes: forward passes of fixed shapes, timed with CUDA events, and a kernel table.

    python bench/gpu_probe.py --model MODEL_DIR --shapes 1024x128,256x512 [--compile] > probe.txt

For each shape (rows x tokens): milliseconds per forward pass, tokens/s, achieved TFLOP/s of the model's
arithmetic, without padding (SDPA can use its flash kernel) and with one padded row (a mask: SDPA falls
back to its memory-efficient kernel). Then the profiler's top kernels for the first shape.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_bench import flops_per_doc  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--shapes", default="1024x128,256x512")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--reps", type=int, default=10)
    a = p.parse_args()
    import torch

    from reembed.embed import Embedder

    emb = Embedder({"name": a.model, "device": "cuda", "dtype": a.dtype}, compile=a.compile)
    cfg = emb.model[0].auto_model.config
    print(f"model {a.model}: {emb.dtype}, attention {emb.attention}, compiled {emb.compiled}, torch {torch.__version__}")
    shapes = [tuple(int(x) for x in s.split("x")) for s in a.shapes.split(",")]
    first = None
    for rows, length in shapes:
        for padded in (False, True):
            ids = torch.randint(1000, cfg.vocab_size, (rows, length), device="cuda")
            mask = torch.ones(rows, length, dtype=torch.int64, device="cuda")
            if padded:
                mask[-1, length // 2:] = 0
            feats = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
            t0 = time.perf_counter()
            with torch.inference_mode():
                for _ in range(3):
                    emb.model(dict(feats))
                torch.cuda.synchronize()
                warm = time.perf_counter() - t0
                times = []
                for _ in range(a.reps):
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    emb.model(dict(feats))
                    e.record()
                    e.synchronize()
                    times.append(s.elapsed_time(e) / 1000)
            sec = statistics.median(times)
            flops = float(flops_per_doc(cfg, np.full(rows, length)).sum())
            print(f"{rows:5d} x {length:4d} {'mask' if padded else 'none':4s}: {1000 * sec:8.2f} ms/forward, "
                  f"{rows * length / sec:11.0f} tokens/s, {rows / sec:9.1f} docs/s, {flops / sec / 1e12:6.1f} TFLOP/s "
                  f"(warm-up {warm:.1f} s)", flush=True)
            if first is None:
                first = feats
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            emb.model(dict(first))
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
    return 0


if __name__ == "__main__":
    sys.exit(main())
