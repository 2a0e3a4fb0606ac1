"""``tshsr-train`` / ``python train.py``: train, then optionally push the kept model to the Hub.

Exit codes: 0 trained (and pushed), 2 bad input (missing data, invalid settings), 3 the loss
diverged, 4 the push to the Hub failed (the trained model is kept locally).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .args import parse_args
from .loop import TrainingDiverged, run

# The files of a trained model that make up its Hub repository.
HUB_FILES = ["config.json", "model.safetensors", "vocab.json", "README.md", "metrics.json"]


def push_folder(folder: Path, repo_id: str) -> str:
    """Upload a trained model's folder (its card included) to ``repo_id``; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    return api.upload_folder(folder_path=str(folder), repo_id=repo_id, allow_patterns=HUB_FILES,
                             commit_message="Upload TSHSR model trained with tshsr-train")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = run(args)
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 reports and pushes
        return 0
    print(f"Best model saved in {out}")
    if args.push_to_hub:
        try:
            url = push_folder(out, args.push_to_hub)
        except Exception as exc:  # network, auth, permissions: the local model is kept either way
            print(f"error: push to the Hub as {args.push_to_hub!r} failed ({type(exc).__name__}: {exc}). "
                  f"The trained model is kept in {out}; push it later with "
                  f"TSHSRModel.from_pretrained('{out}').push_to_hub('{args.push_to_hub}').", file=sys.stderr)
            return 4
        print(f"Pushed to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
