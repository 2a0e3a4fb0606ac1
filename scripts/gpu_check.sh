#!/usr/bin/env bash
# GPU readiness check: a paper-size training step and Flickr30K-test-size exhaustive scoring on
# one GPU (benchmarks/gpu_check.py), then a short DistributedDataParallel training through
# train.py on every visible GPU (torchrun, nccl) on tiny synthetic precomputed features.
# Prints JSON lines and, with --write-results, records the one-GPU numbers in docs/RESULTS.md.
# With --small (a CPU dry run) the DDP part runs 2 CPU processes with gloo. On a one-GPU machine it
# is one process under torchrun (NCCL takes one process per GPU): train.py on CUDA with bf16.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
OUT_DIR="${OUT:-/tmp}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$PY" benchmarks/gpu_check.py --json "$OUT_DIR/gpu_check.json" "$@"

small=0
for arg in "$@"; do [[ "$arg" == "--small" ]] && small=1; done
gpus=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
if [[ "$gpus" -ge 1 ]]; then
    nproc="$gpus"; device=(); batch=32; per_rank=64
elif [[ "$small" == 1 ]]; then
    nproc=2; device=(--device cpu --threads 1); batch=8; per_rank=8
else
    echo '{"ddp": "skipped: no GPU visible"}'
    exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$PY" -c "from tshsr.testing import make_precomp; make_precomp('$work/precomp', n_train=$per_rank * $nproc, n_dev=40, feature_dim=64)"
port=$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
start=$(date +%s)
"$PY" -m torch.distributed.run --nproc_per_node "$nproc" --master_addr 127.0.0.1 --master_port "$port" \
    train.py --dataset precomp --data-dir "$work/precomp" --image-feature-dim 64 --text-encoder bigru \
    --embed-dim 128 --sim-dim 32 --split-val dev --batch-size "$batch" --epochs 2 --log-every 5 \
    --checkpoint-every 10 --val-rerank-k 0 --no-progress --output-dir "$work/ddp" --cache-dir "$work/cache" \
    "${device[@]}"
"$PY" - "$work/ddp" "$nproc" "$(( $(date +%s) - start ))" "$OUT_DIR/gpu_check_ddp.json" <<'EOF'
import json, sys
from pathlib import Path

out, nproc, seconds, target = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
steps = [r for r in records if "loss" in r]
rsum = [r["validation"]["rsum"] for r in records if r.get("validation")]
assert steps and len(rsum) == 2 and (out / "model.safetensors").exists(), "DDP training did not complete"
report = {"ddp": {"processes": nproc, "steps": steps[-1]["step"], "first_loss": steps[0]["loss"],
                  "last_loss": steps[-1]["loss"], "pairs_per_s": steps[-1]["pairs_per_s"], "rsum": rsum,
                  "seconds": seconds}}
Path(target).write_text(json.dumps(report, indent=2))
print(json.dumps(report))
EOF
