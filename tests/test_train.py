"""The trainer end to end: tiny runs through the same `train.py` users run.

Most runs use a SCAN-style precomputed folder (random 16-d "regions") and the BiGRU text encoder,
so no pretrained weights are needed and a run takes seconds; one run uses real Flickr8k photos
and the pretrained backbones when ../shared/data/flickr8k is present.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tshsr.testing import WORDS, make_precomp

ROOT = Path(__file__).resolve().parents[1]
FLICKR8K = ROOT.parent / "shared" / "data" / "flickr8k"


def train_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "--dataset", "precomp", "--data-dir", str(data),
            "--split-val", "dev", "--image-feature-dim", "16", "--text-encoder", "bigru",
            "--embed-dim", "32", "--sim-dim", "16", "--batch-size", "8", "--output-dir", str(out),
            "--cache-dir", str(out.parent / "cache"), "--no-progress", "--val-rerank-k", "0",
            "--threads", "1", *extra]


def run(cmd, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, **kwargs)


def steps_logged(out: Path) -> list[int]:
    lines = (out / "log.jsonl").read_text().splitlines() if (out / "log.jsonl").exists() else []
    return [r["step"] for r in map(json.loads, lines) if "step" in r]


@pytest.fixture()
def data(tmp_path):
    folder = tmp_path / "precomp"
    folder.mkdir()
    return make_precomp(folder)


def test_tiny_run_trains_validates_and_loads(data, tmp_path):
    out = tmp_path / "run"
    result = run(train_cmd(data, out, "--epochs", "3", "--preset", "tshsr", "--log-every", "1"))
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 3 * (48 * 5 // 8)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])  # it learns
    validations = [r["validation"] for r in records if "validation" in r]
    assert len(validations) == 3 and all(0 <= v["rsum"] <= 600 for v in validations)
    from tshsr import TSHSRModel

    model = TSHSRModel.from_pretrained(out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rsum"] == max(v["rsum"] for v in validations)  # the best epoch is the one kept
    card = (out / "README.md").read_text()
    assert (out / "vocab.json").exists() and "RSUM" in card
    best = max(validations, key=lambda v: v["rsum"])
    assert card.count("(best, kept)") == 1 and all(f"{e}: " in card for e in (1, 2, 3))  # every epoch listed
    assert f"{best['rsum']:.1f} (best, kept)" in card
    regions = np.load(data / "dev_ims.npy")[:3]
    out_scores = model.score(regions, ["a big red cat", "a small blue boat"])
    assert out_scores.scores.shape == (3, 2)


def test_refuses_to_overwrite_a_run_without_resume(data, tmp_path):
    out = tmp_path / "run"
    assert run(train_cmd(data, out, "--max-steps", "2", "--checkpoint-every", "1")).returncode == 0
    again = run(train_cmd(data, out, "--max-steps", "2"))
    assert again.returncode != 0 and "--resume" in again.stderr


@pytest.mark.slow
def test_kill_9_then_resume_loses_no_checkpointed_step(data, tmp_path):
    """SIGKILL mid-run, then --resume: training continues at the last checkpoint and ends with
    exactly the weights of an uninterrupted run."""
    steps = ["--epochs", "8", "--checkpoint-every", "3", "--log-every", "1"]
    reference = tmp_path / "reference"
    assert run(train_cmd(data, reference, *steps)).returncode == 0

    out = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(train_cmd(data, out, *steps), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not any(s >= 40 for s in steps_logged(out)):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(steps_logged(out))
    assert killed_at < 8 * 30, "the run finished before it could be killed"
    state = torch.load(out / "checkpoint" / "training_state.pt", weights_only=True)["state"]
    assert killed_at - state["global_step"] < 3 + 1  # at most one checkpoint interval lost

    resumed = run(train_cmd(data, out, *steps, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from" in resumed.stdout
    logged = steps_logged(out)
    assert set(range(1, 8 * 30 + 1)) <= set(logged)  # every step ran
    final = load_file(str(out / "checkpoint" / "weights.safetensors"))
    expected = load_file(str(reference / "checkpoint" / "weights.safetensors"))
    assert final.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(final[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)


def test_resume_takes_the_model_from_the_checkpoint_and_refuses_changes(data, tmp_path):
    """--resume builds the checkpoint's model: flags left at their defaults are no change (this run
    used --preset dual and --embed-dim 32, the resume passes neither), flags given with other
    values are refused, naming each field."""
    out = tmp_path / "run"
    base = [sys.executable, str(ROOT / "train.py"), "--dataset", "precomp", "--data-dir", str(data),
            "--split-val", "", "--image-feature-dim", "16", "--text-encoder", "bigru", "--batch-size", "8",
            "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--threads", "1",
            "--epochs", "1", "--checkpoint-every", "1"]
    first = run([*base, "--preset", "dual", "--embed-dim", "32", "--sim-dim", "16", "--max-steps", "2"])
    assert first.returncode == 0, first.stderr[-3000:]

    refused = run([*base, "--resume", "--max-steps", "3", "--embed-dim", "64", "--stream-fusion", "equal",
                   "--preset", "dual", "--sim-dim", "16"])
    assert refused.returncode == 2
    assert "embed_dim (checkpoint 32, --embed-dim gives 64)" in refused.stderr
    assert "stream_fusion (checkpoint 'learned', --stream-fusion gives 'equal')" in refused.stderr
    assert "preset" not in refused.stderr.split("would change:")[1] and "sim_dim" not in refused.stderr

    refused = run([*base, "--resume", "--max-steps", "3", "--preset", "tshsr", "--text-encoder", "transformers"])
    assert refused.returncode == 2 and "head (checkpoint 'dual', --preset gives 'tshsr')" in refused.stderr
    assert "text_encoder (checkpoint 'bigru', --text-encoder gives 'transformers')" in refused.stderr

    resumed = run([*base, "--resume", "--max-steps", "3"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from" in resumed.stdout and steps_logged(out)[-1] == 3
    config = json.loads((out / "checkpoint" / "config.json").read_text())
    assert (config["head"], config["embed_dim"], config["sim_dim"]) == ("dual", 32, 16)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    folder = tmp_path / "precomp"
    folder.mkdir()
    data = make_precomp(folder, nan_image=30)
    out = tmp_path / "run"
    result = run(train_cmd(data, out, "--epochs", "2", "--checkpoint-every", "1"))
    assert result.returncode == 3
    assert "Loss became nan" in result.stderr and "last good checkpoint" in result.stderr
    weights = load_file(str(out / "checkpoint" / "weights.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_failed_push_keeps_local_model(data, tmp_path):
    out = tmp_path / "run"
    result = run(train_cmd(data, out, "--max-steps", "2", "--push-to-hub", "nobody/tshsr-test"))
    assert result.returncode == 4
    assert "push to the Hub" in result.stderr and "kept in" in result.stderr
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()


@pytest.mark.slow
@pytest.mark.skipif(not FLICKR8K.is_dir(), reason="../shared/data/flickr8k is not present")
def test_flickr8k_smoke_with_pretrained_backbones(tmp_path):
    out = tmp_path / "f8k"
    cmd = [sys.executable, str(ROOT / "train.py"), "--dataset", "flickr8k", "--data-dir", str(FLICKR8K),
           "--max-train-images", "12", "--max-val-images", "8", "--batch-size", "8", "--max-steps", "3",
           "--epochs", "1", "--output-dir", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    result = run(cmd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert steps_logged(out)[-1] == 3
    from tshsr import TSHSRModel
    from tshsr.data import load_split

    model = TSHSRModel.from_pretrained(out)
    split = load_split("imagefolder", "validation", data_dir=str(FLICKR8K), max_images=2)
    scores = model.score(split.images(), split.captions[:3]).scores
    assert scores.shape == (2, 3) and torch.isfinite(scores).all()


def test_crash_during_checkpoint_save_keeps_a_complete_checkpoint(tmp_path, monkeypatch):
    """A crash at any point of save_checkpoint leaves a complete checkpoint that --resume finds."""
    from tshsr import TSHSRConfig, TSHSRModel, Vocabulary
    from tshsr_train import checkpoint as training

    vocab = Vocabulary(WORDS)
    cfg = TSHSRConfig.preset("tshsr", image_encoder="precomputed", image_feature_dim=16, text_encoder="bigru",
                             vocab_size=len(vocab), embed_dim=32, sim_dim=16)
    model = TSHSRModel(cfg, vocabulary=vocab)
    optimizer = torch.optim.Adam(model.parameters())
    target = tmp_path / "checkpoint"
    training.save_checkpoint(target, model, optimizer, {"global_step": 10})
    first = load_file(str(target / "weights.safetensors"))

    real_replace = os.replace
    for crash_at in (0, 1):  # before the old folder is moved aside / before the new one is moved in
        calls = {"n": 0}

        def flaky_replace(src, dst, _crash_at=crash_at):
            if calls["n"] == _crash_at:
                raise OSError("simulated crash")
            calls["n"] += 1
            return real_replace(src, dst)

        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        monkeypatch.setattr(training.os, "replace", flaky_replace)
        with pytest.raises(OSError):
            training.save_checkpoint(target, model, optimizer, {"global_step": 20})
        monkeypatch.setattr(training.os, "replace", real_replace)
        found = training.find_checkpoint(tmp_path)
        assert found is not None
        state = torch.load(found / "training_state.pt", weights_only=True)["state"]
        assert state["global_step"] == 10
        weights = load_file(str(found / "weights.safetensors"))
        assert all(torch.equal(weights[k], first[k]) for k in first)
        if found.name != "checkpoint":  # restore the layout for the next round
            real_replace(found, target)


def _photo_folder(root: Path, n_train: int = 6) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = root / "train"
    folder.mkdir(parents=True)
    rows = []
    for i in range(n_train):
        pixels = rng.integers(0, 255, size=(30, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "captions": [f"photo {i}", f"picture number {i}"]}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


@pytest.mark.slow
def test_finetuned_image_batches_come_from_the_loader_and_resume_mid_epoch(tmp_path, monkeypatch):
    """--finetune-image takes its photos from tshsr.pipeline's DataLoader: the weights equal those of
    decoding the photos inline (the trainer before the loader), and a run stopped after step 2 of
    3 and resumed (the loader starting at step 2) ends with the uninterrupted run's weights."""
    from tshsr import pipeline
    from tshsr_train import TrainArgs, loop, run as train

    data = _photo_folder(tmp_path / "photos")  # 12 captions, batch 4: 3 steps in the epoch
    common = dict(dataset="imagefolder", data_dir=str(data), val_split=None, finetune_image=True, batch_size=4,
                  epochs=1, embed_dim=32, sim_dim=16, cache_dir=str(tmp_path / "cache"), progress=False, threads=1,
                  checkpoint_every=1)
    starts = []
    real_set_epoch = pipeline.StepBatchSampler.set_epoch
    monkeypatch.setattr(pipeline.StepBatchSampler, "set_epoch",
                        lambda self, epoch, start_step=0: starts.append(start_step) or real_set_epoch(self, epoch, start_step))

    train(TrainArgs(**common, output_dir=str(tmp_path / "loader"), max_steps=3))
    train(TrainArgs(**common, output_dir=str(tmp_path / "resumed"), max_steps=2))
    train(TrainArgs(**common, output_dir=str(tmp_path / "resumed"), max_steps=3, resume=True))
    assert starts[-1] == 2  # the resumed epoch's loader skipped the two steps already trained
    monkeypatch.setattr(loop.BatchSource, "use_loader", lambda self, args: None)
    train(TrainArgs(**common, output_dir=str(tmp_path / "inline"), max_steps=3))

    loader, resumed, inline = (load_file(str(tmp_path / name / "checkpoint" / "weights.safetensors"))
                               for name in ("loader", "resumed", "inline"))
    assert any(k.startswith("image_backbone.") for k in loader)  # the backbone was trained
    for key in loader:
        assert torch.equal(loader[key], inline[key]), key
        torch.testing.assert_close(resumed[key], loader[key], rtol=1e-4, atol=1e-5, msg=key)


def test_context_detach_trains_and_is_refused_without_a_context_level(data, tmp_path):
    result = run(train_cmd(data, tmp_path / "run", "--epochs", "1", "--preset", "tshsr", "--level-cosine",
                           "--alignment-weight", "1.0", "--context-detach", "--context-units", "3", "2",
                           "--max-steps", "3"))
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["context_units_image"], config["context_units_text"]) == (3, 2)
    card = (tmp_path / "run" / "README.md").read_text()  # the card says how it was trained
    assert ("recipe (flags off the trainer's defaults): `--level-cosine --context-units 3 2 --alignment-weight 1.0 "
            "--context-detach`") in card
    flat = run(train_cmd(data, tmp_path / "flat", "--epochs", "1", "--preset", "flat", "--context-detach"))
    assert flat.returncode != 0 and "--context-detach needs a preset with the context level" in flat.stderr


def test_separate_streams_trains_and_is_refused_with_one_stream(data, tmp_path):
    result = run(train_cmd(data, tmp_path / "run", "--epochs", "1", "--preset", "tshsr", "--level-cosine",
                           "--alignment-weight", "1.0", "--separate-streams", "--max-steps", "3"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["separate_streams"] is True
    assert "--separate-streams" in (tmp_path / "run" / "README.md").read_text()
    one = run(train_cmd(data, tmp_path / "i2t", "--epochs", "1", "--preset", "i2t", "--separate-streams"))
    assert one.returncode != 0 and "separate_streams" in one.stderr


def test_window_context_units_train_and_need_a_grid(data, tmp_path):
    grid = make_precomp(tmp_path / "grid", regions=9)  # a 3x3 grid of regions
    result = run(train_cmd(grid, tmp_path / "run", "--epochs", "1", "--preset", "tshsr", "--level-cosine",
                           "--context-pooling", "windows", "--context-units", "4", "3", "--max-steps", "3"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["context_pooling"] == "windows"
    card = (tmp_path / "run" / "README.md").read_text()
    assert "--context-pooling windows" in card and "3 phrase windows along each caption" in card
    five = run(train_cmd(data, tmp_path / "five", "--epochs", "1", "--preset", "tshsr", "--context-pooling",
                         "windows", "--context-units", "4", "3", "--max-steps", "3"))
    assert five.returncode != 0 and "needs a square grid of regions" in five.stderr
    assert not (tmp_path / "five" / "model.safetensors").exists()


def test_fixed_level_weights_train_and_must_match_the_levels(data, tmp_path):
    result = run(train_cmd(data, tmp_path / "run", "--epochs", "1", "--preset", "tshsr", "--level-fusion", "fixed",
                           "--level-weights", "1", "0", "1", "--max-steps", "3"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["level_weights"] == [1.0, 0.0, 1.0]
    assert "--level-fusion fixed --level-weights 1.0 0.0 1.0" in (tmp_path / "run" / "README.md").read_text()
    flat = run(train_cmd(data, tmp_path / "flat", "--epochs", "1", "--preset", "flat", "--level-fusion", "fixed",
                         "--level-weights", "1", "0", "1"))
    assert flat.returncode != 0 and "one non-negative weight per level" in flat.stderr
