"""Every command of README.md's training section runs, offline, on tiny fixtures.

The ```bash blocks of the section are parsed; each command is checked against the parser of the
program it calls (a flag the trainer does not know fails the test) and then run with its data
swapped for a fixture: a tiny image folder for ``../shared/data/flickr8k``, the Hub layouts of
tests/test_hub_data.py behind ``TSHSR_HUB_MIRROR`` (COCO photo URLs served from a local HTTP
server), synthetic precomputed features, and limits that make it one step
(``--max-steps 1 --epochs 1 --batch-size 4``, a few images). A command of a kind the mapping
below does not know also fails, so a new README command needs a fixture here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.test_hub_data import _serve_coco, _write_flickr30k, image_server, mirror  # noqa: F401
from tshsr import hub_data
from tshsr.testing import make_precomp

ROOT = Path(__file__).resolve().parents[1]
ONE_STEP = ["--max-steps", "1", "--epochs", "1", "--batch-size", "4", "--max-train-images", "4",
            "--max-val-images", "4", "--val-rerank-k", "0", "--no-progress", "--threads", "1"]


def readme_training_commands(text: str | None = None) -> list[list[str]]:
    text = (ROOT / "README.md").read_text() if text is None else text
    section = text.split("\n## Training\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(shlex.split(line))
    return commands


COMMANDS = readme_training_commands()


def _imagefolder(root: Path) -> Path:
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40), (40, 220, 220), (120, 60, 200)]
    for split, items in (("train", range(4)), ("validation", range(4, 6))):
        folder = root / split
        folder.mkdir(parents=True)
        rows = []
        for i in items:
            Image.new("RGB", (40, 30), colours[i]).save(folder / f"{i}.png")
            rows.append(json.dumps({"file_name": f"{i}.png", "captions": [f"photo {i} one", f"photo {i} two"]}))
        (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


class Fixtures:
    """README paths -> fixture paths, built on first use."""

    def __init__(self, tmp: Path, hub: Path, server: dict):
        self.tmp = tmp
        _write_flickr30k(hub)
        _serve_coco(hub, server)  # yerevann/coco-karpathy, its photo URLs on the local server
        self.paths: dict[str, Path] = {}

    def data(self, readme_path: str) -> Path:
        if readme_path not in self.paths:
            if readme_path == "../shared/data/flickr8k":
                self.paths[readme_path] = _imagefolder(self.tmp / "flickr8k")
            elif readme_path.endswith("_precomp"):
                self.paths[readme_path] = make_precomp(self.tmp / "precomp", n_train=6, n_dev=4, feature_dim=2048)
            elif readme_path == "data/coco":
                self.paths[readme_path] = self.tmp / "coco"
            else:
                pytest.fail(f"README training command uses data folder {readme_path!r}: add a fixture for it")
        return self.paths[readme_path]

    def coco_images(self, readme_path: str) -> Path:
        folder = self.data(readme_path)
        if not folder.exists():
            self.download_coco(["--output", readme_path])
        return folder

    def download_coco(self, argv: list[str]) -> Path:
        from tshsr import download_coco

        argv = list(argv)
        i = argv.index("--output")
        argv[i + 1] = str(self.data(argv[i + 1]))
        assert download_coco.main([*argv, "--workers", "4", "--no-progress"]) == 0
        return Path(argv[i + 1])

    def train_argv(self, argv: list[str]) -> list[str]:
        """The README's trainer flags, checked by the trainer's parser, with fixture data and one step."""
        from tshsr_train.args import build_parser

        try:
            build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"README training command does not parse: train.py {shlex.join(argv)}")
        argv = list(argv)
        for flag in ("--data-dir", "--image-root", "--output-dir"):
            if flag in argv:
                i = argv.index(flag) + 1
                if flag == "--output-dir":
                    argv[i] = str(self.tmp / argv[i])
                elif flag == "--image-root":
                    argv[i] = str(self.coco_images(argv[i]))
                else:
                    argv[i] = str(self.data(argv[i]))
        if "--num-workers" in argv:  # as many DataLoader workers as the 2-core test machine has
            i = argv.index("--num-workers") + 1
            argv[i] = str(min(2, int(argv[i])))
        if "--output-dir" not in argv:
            argv += ["--output-dir", str(self.tmp / "runs" / "default")]
        return [*argv, "--cache-dir", str(self.tmp / "cache"), *ONE_STEP]


def _output_dir(argv: list[str]) -> Path:
    return Path(argv[argv.index("--output-dir") + 1])


def _trained(out: Path) -> None:
    steps = [json.loads(x).get("step") for x in (out / "log.jsonl").read_text().splitlines()]
    assert 1 in steps and (out / "model.safetensors").exists() and (out / "config.json").exists()


def run_command(tokens: list[str], fx: Fixtures, monkeypatch) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if tokens[:2] == ["python", "train.py"]:
        from tshsr import pipeline
        from tshsr_train import cli

        argv = fx.train_argv(tokens[2:])
        pushed, loaders = [], []
        monkeypatch.setattr(cli, "push_folder", lambda folder, repo: pushed.append((folder, repo)) or "url")
        real_loader = pipeline.image_batch_loader
        monkeypatch.setattr(pipeline, "image_batch_loader", lambda *a, **k: loaders.append(k) or real_loader(*a, **k))
        assert cli.main(argv) == 0
        _trained(_output_dir(argv))
        if "--push-to-hub" in argv:
            assert pushed == [(_output_dir(argv), argv[argv.index("--push-to-hub") + 1])]
        if "--finetune-image" in argv:  # photos came through the DataLoader pipeline, with the workers asked for
            workers = int(argv[argv.index("--num-workers") + 1]) if "--num-workers" in argv else 0
            assert [k["num_workers"] for k in loaders] == [workers]
    elif tokens[:3] == ["python", "-m", "tshsr.download_coco"]:
        folder = fx.download_coco(tokens[3:])
        assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["train2014", "val2014"]
    elif tokens[0] == "torchrun":
        script = tokens.index("train.py")
        options = tokens[1:script]
        assert options[:1] == ["--nproc_per_node"] and len(options) == 2, options
        # Two steps (one per epoch on the fixture): DDP finds a parameter left without a gradient
        # only when the next step starts.
        argv = [*fx.train_argv(tokens[script + 1:]), "--epochs", "2", "--max-steps", "2"]
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), "train.py", *argv]
        result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        _trained(_output_dir(argv))
        steps = [json.loads(x).get("step") for x in (_output_dir(argv) / "log.jsonl").read_text().splitlines()]
        assert 2 in steps
    elif tokens[:2] == ["bash", "scripts/gpu_check.sh"]:
        results = ROOT / "docs" / "RESULTS.md"
        before = results.read_text() if results.exists() else None
        result = subprocess.run(["bash", "scripts/gpu_check.sh", *tokens[2:], "--small"], cwd=ROOT, timeout=300,
                                env={**env, "PYTHON": sys.executable, "OUT": str(fx.tmp)}, capture_output=True,
                                text=True)
        assert result.returncode == 0, result.stderr[-3000:]
        assert '"ddp": {"processes": 2' in result.stdout  # the DDP run, 2 gloo processes on CPU
        assert (results.read_text() if results.exists() else None) == before  # a dry run records nothing
    else:
        pytest.fail(f"README training command not covered by tests/test_readme_commands.py: {shlex.join(tokens)}")


def test_the_training_section_has_the_commands_users_need() -> None:
    text = "\n".join(shlex.join(c) for c in COMMANDS)
    for needle in ("train.py --dataset flickr8k", "--hf-dataset", "--streaming", "python -m tshsr.download_coco",
                   "--image-root", "torchrun --nproc_per_node", "--finetune-image", "scripts/gpu_check.sh"):
        assert needle in text, needle


def test_an_unknown_flag_in_the_readme_fails(tmp_path, mirror, image_server) -> None:  # noqa: F811
    fx = Fixtures(tmp_path, mirror, image_server)
    with pytest.raises(pytest.fail.Exception, match="does not parse"):
        fx.train_argv(["--dataset", "flickr30k", "--no-such-flag"])
    commands = readme_training_commands("intro\n## Training\n```bash\nmake train\n```\n")
    with pytest.raises(pytest.fail.Exception, match="not covered"):
        run_command(commands[0], fx, None)


@pytest.mark.parametrize("tokens", COMMANDS, ids=[" ".join(c[:4]) for c in COMMANDS])
def test_readme_training_command_runs_on_fixtures(tokens, tmp_path, mirror, image_server, monkeypatch) -> None:  # noqa: F811
    assert os.environ[hub_data.MIRROR_ENV] == str(mirror)
    run_command(tokens, Fixtures(tmp_path, mirror, image_server), monkeypatch)


def test_evaluate_takes_the_same_hub_options(tmp_path, mirror, capsys) -> None:  # noqa: F811
    """tshsr-evaluate reads a split with --hf-dataset / --columns as the trainer does."""
    from tshsr_train import evaluate_cli

    _write_flickr30k(mirror)
    output = tmp_path / "metrics.json"
    code = evaluate_cli.main(["--model", str(ROOT / "checkpoints" / "tshsr-flickr8k"), "--dataset", "imagefolder",
                              "--hf-dataset", "nlphuji/flickr30k", "--columns", "split=split,image_id=filename",
                              "--split", "test", "--output", str(output), "--no-progress", "--device", "cpu"])
    assert code == 0
    metrics = json.loads(output.read_text())
    assert (metrics["n_images"], metrics["n_captions"]) == (2, 10)  # the fixture's two test photos


def test_the_readme_flickr8k_command_is_the_bundled_models_recipe(monkeypatch) -> None:
    """The README's Flickr8k command says how the bundled model was made: it must set what
    benchmarks/flickr8k_default.py trains it with (DEFAULT_RECIPE at the study's budget), so a
    new default recipe cannot leave the README on the old one."""
    import dataclasses

    from tshsr_train.args import parse_args

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from flickr8k_default import COMMON, RUNS

    readme = next(c for c in COMMANDS if c[:2] == ["python", "train.py"] and "flickr8k" in c)
    paths = ["--data-dir", "d", "--output-dir", "o"]
    ours = dataclasses.asdict(parse_args(readme[2:] + paths))
    bundled = dataclasses.asdict(parse_args(paths + COMMON + RUNS["tshsr"]))
    skip = {"given", "data_dir", "output_dir", "progress"}
    differ = {k: (ours[k], bundled[k]) for k in ours if k not in skip and ours[k] != bundled[k]}
    assert not differ, f"README (left) and DEFAULT_RECIPE (right) differ: {differ}"
