#!/usr/bin/env python
"""One-GPU readiness check at the paper's size, prepared to run start to finish in a few minutes.

1. Training: TSHSR (and SGR) on random 36 x 2048 region features and BiGRU captions of 12 words,
   batch 128, D 1024, m 256, bf16 autocast, all B x B pairs scored (the paper's hardest-negative
   setting): step time, image-caption pairs per second, peak GPU memory.
2. Evaluation: exhaustive scoring at Flickr30K-test size (1,000 images x 5,000 captions, random
   features of paper size): seconds and pairs per second.

    python benchmarks/gpu_check.py [--json OUT] [--write-results]     # on the GPU machine
    python benchmarks/gpu_check.py --small                              # a CPU dry run of the script

``scripts/gpu_check.sh`` wraps it. Numbers go to docs/RESULTS.md with the card's name
(``--write-results``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from tshsr import TSHSRConfig, TSHSRModel, Vocabulary  # noqa: E402
from tshsr.losses import contrastive_loss, hinge_loss  # noqa: E402


def build(preset: str, regions_dim: int, D: int, m: int, device) -> TSHSRModel:
    vocab = Vocabulary([f"w{i}" for i in range(2000)])
    cfg = TSHSRConfig.preset(preset, image_encoder="precomputed", image_feature_dim=regions_dim,
                             text_encoder="bigru", vocab_size=len(vocab), embed_dim=D, sim_dim=m)
    return TSHSRModel(cfg, vocabulary=vocab).to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_steps(preset, args, device) -> dict:
    model = build(preset, args.region_dim, args.embed_dim, args.sim_dim, device).train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    B, K, L = args.batch, args.regions, args.words
    regions = torch.randn(B, K, args.region_dim, device=device)
    rmask = torch.ones(B, K, dtype=torch.bool, device=device)
    ids = torch.randint(4, 2000, (B, L), device=device)
    positive = torch.eye(B, dtype=torch.bool, device=device)
    pi, pt = torch.ones(B, B, device=device).nonzero(as_tuple=True)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.warmup + args.steps):
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            feats, fmask = model.text_backbone(ids, torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool))
            img = model.encode_image_features(regions, rmask)
            txt = model.encode_text_features(feats, fmask)
            out = model.score_pairs(img, txt, pi, pt)
            scores = out.scores.float().view(B, B)
            loss = hinge_loss(scores, positive) + contrastive_loss(
                model.global_similarity(img, txt).float(), positive, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
        sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    step_s = sorted(times)[len(times) // 2]
    return {"preset": preset, "step_s": round(step_s, 4), "pairs_per_s": round(B * B / step_s, 1),
            "peak_gpu_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None}


@torch.no_grad()
def exhaustive_eval(preset, args, device) -> dict:
    model = build(preset, args.region_dim, args.embed_dim, args.sim_dim, device).eval()
    n_img, n_cap = args.eval_images, args.eval_captions
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
        img = model.encode_image_features(torch.randn(n_img, args.regions, args.region_dim, device=device),
                                          torch.ones(n_img, args.regions, dtype=torch.bool, device=device))
        ids = torch.randint(4, 2000, (n_cap, args.words), device=device)
        feats, fmask = model.text_backbone(ids, torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool))
        txt = model.encode_text_features(feats, fmask)
        sync(device)
        start = time.perf_counter()
        scores = model.score_encoded(img, txt, block_pairs=args.block_pairs).scores
        sync(device)
    seconds = time.perf_counter() - start
    assert torch.isfinite(scores).all()
    return {"preset": preset, "images": n_img, "captions": n_cap, "seconds": round(seconds, 2),
            "pairs_per_s": round(n_img * n_cap / seconds, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny sizes, for a dry run on CPU")
    p.add_argument("--json", default=None)
    p.add_argument("--write-results", action="store_true")
    p.add_argument("--presets", default="tshsr,sgr")
    args = p.parse_args()
    sizes = dict(batch=128, regions=36, region_dim=2048, words=12, embed_dim=1024, sim_dim=256, steps=10, warmup=3,
                 eval_images=1000, eval_captions=5000, block_pairs=65536)
    if args.small:
        sizes.update(batch=8, region_dim=64, embed_dim=32, sim_dim=16, steps=2, warmup=1, eval_images=20,
                     eval_captions=100, block_pairs=512)
    for k, v in sizes.items():
        setattr(args, k, v)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    report = {"device": name, "sizes": sizes, "train": [], "eval": []}
    for preset in args.presets.split(","):
        report["train"].append(train_steps(preset, args, device))
        print(json.dumps(report["train"][-1]), flush=True)
        report["eval"].append(exhaustive_eval(preset, args, device))
        print(json.dumps(report["eval"][-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.write_results and not args.small:
        from results_md import git_commit, write_section

        lines = [f"## GPU check ({name})", "",
                 f"`python benchmarks/gpu_check.py --write-results`, commit {git_commit()}. Paper size: "
                 "36 x 2048 regions, 12-word captions, batch 128 (all 16,384 pairs a step), D 1024, m 256, bf16.", "",
                 "| preset | train step s | train pairs/s | peak GPU GB | eval 1K x 5K s | eval pairs/s |",
                 "|---|---|---|---|---|---|"]
        for t, e in zip(report["train"], report["eval"]):
            lines.append(f"| {t['preset']} | {t['step_s']} | {t['pairs_per_s']:.0f} | {t['peak_gpu_mem_gb']} | "
                         f"{e['seconds']} | {e['pairs_per_s']:.0f} |")
        write_section("gpu_check", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
