"""Every recipe of the streams study (benchmarks/streams_study.py) is a valid trainer command line:
a typo in a recipe must fail here, not 50 minutes into a background run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the scripts import their siblings
from streams_study import BUDGET, RECIPES  # noqa: E402

from tshsr_train import parse_args  # noqa: E402
from tshsr_train.model_config import build_config  # noqa: E402


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_flags_parse_and_build_a_config(name: str) -> None:
    _, flags = RECIPES[name]
    args = parse_args(["--dataset", "flickr8k", "--data-dir", "d", *flags, *BUDGET])
    config = build_config(args, None)
    assert config.preset_name == args.preset


def _ablation_runs() -> list[tuple[str, str]]:
    from ablation_full import ROUNDS

    return [(round_, preset) for round_, flags in ROUNDS for preset in flags]


@pytest.mark.parametrize("round_,preset", _ablation_runs())
def test_every_ablation_round_builds_each_preset(round_: str, preset: str) -> None:
    from ablation_full import BUDGET as ABLATION_BUDGET
    from ablation_full import recipe

    args = parse_args(["--dataset", "flickr8k", "--data-dir", "d", "--preset", preset, *recipe(preset, round_),
                       *ABLATION_BUDGET])
    assert build_config(args, None).preset_name == preset


def test_train_time_counts_a_paused_run_as_idle() -> None:
    """train_time.py refuses to time while another run shares the cores; one paused with kill -STOP holds none."""
    import signal
    import subprocess
    import time

    from train_time import _stopped

    child = subprocess.Popen(["sleep", "30"])
    try:
        assert not _stopped(str(child.pid))
        child.send_signal(signal.SIGSTOP)
        for _ in range(50):  # the state changes asynchronously
            if _stopped(str(child.pid)):
                break
            time.sleep(0.02)
        assert _stopped(str(child.pid))
    finally:
        child.kill()
        child.wait()
    assert not _stopped("999999999")  # no such process: not paused


def test_ablation_run_folders_name_flag_values() -> None:
    """Runs already on disk keep their folders; a round that only changes a value gets its own."""
    from ablation_full import recipe, run_folder

    root = Path("runs")
    tshsr = run_folder(root, "tshsr", 0, recipe("tshsr", "v9"))
    assert tshsr.name == "tshsr-detach-skip-separate-windows-ctx0-views2-text1-s0"
    assert run_folder(root, "i2t", 1, recipe("i2t", "v9")).name == "i2t-detach-skip-windows-ctx0-views2-text1-s1"
    assert run_folder(root, "dual", 2, recipe("dual", "v8")).name == "dual-text1-s2"
    assert run_folder(root, "dual", 0, ["--augment-views", "4"]).name == "dual-views4-s0"
    t2i = run_folder(root, "t2i", 0, recipe("t2i", "v10"))
    assert t2i.name == "t2i-detach-skip-windows-ctx0-views2-text1-layer3-s0"


def test_v10_changes_only_the_presets_whose_t2i_stream_has_a_context_level() -> None:
    """v10 adds the layer-3 caption context units, which only the text-to-image stream reads; every other preset
    keeps v9's flags, so its runs count in both rounds instead of being trained again (i2t's would be the same
    run: the unused projection is built last)."""
    from ablation_full import CAPTION_CONTEXT, PRESETS, recipe

    from tshsr.config import TSHSRConfig

    configs = {p: TSHSRConfig.preset(p) for p in PRESETS}
    readers = {p for p, c in configs.items() if "t2i" in c.streams and "context" in c.levels}
    assert set(CAPTION_CONTEXT) == readers == {"t2i", "tshsr"}  # the list agrees with the presets themselves
    for preset in ("dual", "i2t", "flat", "sgr", "saf"):
        assert recipe(preset, "v10") == recipe(preset, "v9")
    for preset in CAPTION_CONTEXT:
        flags = recipe(preset, "v10")
        assert flags[flags.index("--text-context-layer") + 1] == "3"
        assert [f for f in flags if f not in ("--text-context-layer", "3")] == recipe(preset, "v9")


def test_v11_moves_the_caption_context_units_to_the_token_embeddings() -> None:
    """v11 changes v10 in one value: the caption context units read MiniLM's layer 0 instead of layer 3. Only t2i
    and tshsr read them, so every other preset keeps v10's runs; tshsr's flags are the streams study's recipe, so its
    runs are read from the study instead of trained again."""
    from ablation_full import CAPTION_CONTEXT, recipe
    from streams_study import RECIPES

    for preset in ("dual", "i2t", "flat", "sgr", "saf"):
        assert recipe(preset, "v11") == recipe(preset, "v10")
    for preset in CAPTION_CONTEXT:
        flags = recipe(preset, "v11")
        assert flags[flags.index("--text-context-layer") + 1] == "0"
        v10 = recipe(preset, "v10")
        assert flags == ["0" if i and v10[i - 1] == "--text-context-layer" else f for i, f in enumerate(v10)]
    assert ["--preset", "tshsr", *recipe("tshsr", "v11")] == RECIPES[
        "detach-skip-separate-windows-ctx0-layer0-views2-text1"][1]


def test_the_default_model_script_refuses_a_run_of_another_recipe(tmp_path) -> None:
    """benchmarks/flickr8k_default.py never ships (or reports) a finished run of an earlier default recipe."""
    import json
    from dataclasses import asdict

    import flickr8k_default

    cmd = [sys.executable, "train.py", "--data-dir", "d", "--output-dir", str(tmp_path), *flickr8k_default.COMMON,
           *flickr8k_default.RUNS["dual"]]
    settings = asdict(parse_args(cmd[2:]))
    (tmp_path / "train_args.json").write_text(json.dumps({**settings, "threads": 1, "data_dir": "elsewhere"}))
    assert flickr8k_default.stale_settings(tmp_path, cmd) == {}  # paths and threads do not change the recipe
    (tmp_path / "train_args.json").write_text(json.dumps({**settings, "epochs": settings["epochs"] + 2}))
    assert flickr8k_default.stale_settings(tmp_path, cmd) == {"epochs": (settings["epochs"] + 2, settings["epochs"])}


def test_train_time_reports_the_default_against_the_target_and_lists_every_timing() -> None:
    from flickr8k_default import DEFAULT_RECIPE
    from train_time import report

    def timing(recipe: str, total: float, epochs: list[float], **extra) -> dict:
        return {"recipe": recipe, "total": total, "setup": 900.0, "epoch_seconds": epochs, "best": 308.04,
                "shipped": True, "threads": 2, "load_before": 0.1, "busy": [], "machine": "CPU", "commit": "abc",
                "command": "python train.py", "date": "2026-12-07", **extra}

    candidate = "detach-skip-separate-windows-ctx0-layer0-views2-text1-e6"
    text = "\n".join(report([timing(DEFAULT_RECIPE, 2496.0, [400.0] * 4),
                             timing(candidate, 4236.7, [480.0] * 6, shipped=False, note="slow day")]))
    assert f"The default recipe `{DEFAULT_RECIPE}`" in text and "| **total** | **2496** | **41.6** |" in text
    assert "| training: 4 epochs + validation after each | 1596 | 26.6 |" in text and "**met**" in text
    assert f"| `{candidate}` | CPU, 2 | 900 | 480 / 480 / 480 / 480 / 480 / 480 | 70.6 | 308.0 | no; slow day |" in text
    assert "not the shipped" not in text  # the candidate is listed, never reported as the default
