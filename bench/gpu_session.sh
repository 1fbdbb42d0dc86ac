#!/bin/bash
# One GPU session on the lent device machine (see bench/RESULTS.md): environment check, the job's control plane
# with a null embedder (bench/control_plane.py: workers write the shards, O(1) commits; 1k/10k/50k shards),
# BGE-large-architecture model build, forward-pass probe, Embedder variants, tuner, the three-way benchmark
# (its (c) is pipeline.run: the same worker-written, commit-log job path), and FAISS GPU training when faiss-gpu
# is there (bench/faiss_scale.py --train-only; skipped otherwise). Expects the
# repository's .device/ folder (bundle.tar.xz with Ray etc. for Python 3.12, src/, bench/, tok/ with
# bert-base-uncased tokenizer files) and writes everything worth keeping under $OUT (8 files at most).
#
#   bash .device/bench/gpu_session.sh [MIXES]     (default fixed128:100000:16000,fixed512:24000:4000,mixed:40000:8000)
set -u
D=$PWD/.device
W=/tmp/work
mkdir -p /tmp/site "$W" && tar xJf "$D/bundle.tar.xz" -C /tmp/site
export PYTHONPATH=/tmp/site:$D/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 REEMBED_TUNE_DIR=$W/tuning RAY_DEDUP_LOGS=0
LOG=$OUT/bench.log
MIXES=${1:-fixed128:100000:16000,fixed512:24000:4000,mixed:40000:8000}
T0=$(date +%s)
stamp() { echo "== $(( $(date +%s) - T0 )) s: $*" | tee -a "$LOG"; }

stamp "environment"
{ nvidia-smi; python3 -c "
import torch, transformers, sentence_transformers, tokenizers, ray, pyarrow
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))
print('transformers', transformers.__version__, 'sentence-transformers', sentence_transformers.__version__,
      'tokenizers', tokenizers.__version__, 'ray', ray.__version__, 'pyarrow', pyarrow.__version__)"; nproc; free -g; df -h /dev/shm /tmp; } >>"$LOG" 2>&1

stamp "control plane (null embedder)"
timeout "${CP_TIMEOUT:-240}" python3 "$D/bench/control_plane.py" --sizes "${CP_SIZES:-1000,10000,50000}" --shard-rows 10 \
  --out "$W/control-plane" --tmp /dev/shm >>"$LOG" 2>&1 || stamp "control plane failed or timed out"

stamp "build BGE-large-architecture model"
python3 -c "
from reembed.testing import bge_large_random
bge_large_random('$W/models/bge-large-random', tokenizer='$D/tok')" >>"$LOG" 2>&1 || { stamp "model build failed"; exit 1; }

stamp "probe"
timeout 90 python3 "$D/bench/gpu_probe.py" --model "$W/models/bge-large-random" --shapes 1024x128,256x512 >"$OUT/probe.txt" 2>>"$LOG"

stamp "variants"
timeout 150 python3 "$D/bench/variants.py" --model "$W/models/bge-large-random" --work "$W" --out "$OUT/variants.json" \
  --mix fixed128:30000,fixed512:12000 --batch-tokens 131072 --variants "${VARIANTS:-default;fuse=0;tokenize_workers=0}" >>"$LOG" 2>&1

stamp "benchmark"
timeout "${BENCH_TIMEOUT:-360}" python3 "$D/bench/run_bench.py" --model bge-large-random --tokenizer "$D/tok" --work "$W" \
  --out "$OUT" --mix "$MIXES" --tune --tune-budgets "${TUNE_BUDGETS:-32768,65536,131072,262144,524288}" --keep-going \
  --label "H100 BGE-large" >>"$LOG" 2>&1
stamp "benchmark done"

# FAISS training on the GPU (issue 13): only where faiss-gpu is installed and sees the device; skipped cleanly
# otherwise. Times reembed.indexes.faiss_dist.train (the build's one training task) on a clustered 1024-d
# sample, GPU k-means, then the same on the CPU cores for comparison; then the whole distributed build at 1M.
stamp "FAISS GPU training"
if python3 -c "import faiss, sys; sys.exit(0 if faiss.get_num_gpus() > 0 else 3)" >>"$LOG" 2>&1; then
  timeout "${FAISS_TIMEOUT:-300}" python3 "$D/bench/faiss_scale.py" --train-only "${FAISS_TRAIN:-262144:4096,1000000:16384}" \
    --out "$OUT/faiss_train.json" >>"$LOG" 2>&1 || stamp "FAISS GPU training failed or timed out"
  timeout "${FAISS_BUILD_TIMEOUT:-300}" python3 "$D/bench/faiss_scale.py" --sizes 1000000 --workers 1,4,8 --cpus 16 \
    --memory 16G --work "$W/faiss" --out "$OUT/faiss_scale.json" >>"$LOG" 2>&1 || stamp "FAISS build failed or timed out"
else
  stamp "FAISS GPU training skipped: faiss is not installed here or sees no GPU (faiss-cpu)"
fi
(cd "$W" && tar czf "$OUT/manifests.tgz" job-*/manifest.json job-*/_log/_checkpoints control-plane tuning 2>/dev/null)
stamp "end"
