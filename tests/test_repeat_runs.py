"""benchmarks/repeat_runs.py: the spread of one command's runs and the per-group margins between recipes,
and the check that adopts a run trained elsewhere only when its steps are this machine's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the scripts import their siblings
import repeat_runs  # noqa: E402
import results_md  # noqa: E402


def run(recipe: str, seed: int, group: str, best: float, machine: str = "AMD EPYC, 2 cores") -> dict:
    return {"recipe": recipe, "seed": seed, "group": group, "best": best, "threads": 1, "machine": machine}


def test_spread_and_margins_are_per_command_and_per_group() -> None:
    runs = [run("a", 0, "study", 310.0, "Intel(R) Xeon(R) Processor"), run("a", 0, "g1", 306.0),
            run("b", 0, "study", 306.0), run("b", 0, "g1", 307.0),
            run("a", 1, "g1", 309.0), run("b", 1, "g1", 308.5), run("a", 2, "study", 300.0)]
    text = repeat_runs.summarize(["a", "b"], runs)
    rows = {line.split(" | ")[0].strip("| ") + line.split(" | ")[1]: line for line in text.splitlines()
            if line.startswith("| a |") or line.startswith("| b |")}
    assert rows["a0"].endswith("| 4.0 |") and "310.0 (Xeon, 1 thr, study)" in rows["a0"]
    assert rows["b0"].endswith("| 1.0 |")
    assert rows["a2"].endswith("| — |")  # one run: no spread
    margins = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| study")
               or line.startswith("| g1")}
    assert margins["study"] == "| study | s0 +4.0 | +4.0 | — | 1/1 |"  # seed 2 has no b run in the study
    assert margins["g1"] == "| g1 | s0 -1.0, s1 +0.5 | -0.2 | 1.1 | 1/2 |"
    assert "1.0 to 4.0 RSUM over 2 commands" in text


def test_a_run_adopted_into_a_group_is_one_run_not_two() -> None:
    study = {**run("a", 1, "study", 307.7), "folder": "runs/streams/a-s1"}
    adopted = {**run("a", 1, "g1", 307.7), "adopted": {"from": "runs/streams/a-s1", "identical_steps": 50}}
    rerun = run("a", 1, "g2", 305.0)  # its own folder, runs/repeat/g2/a-s1
    text = repeat_runs.summarize(["a"], [study, adopted])
    assert "307.7 (EPYC, 1 thr, study = g1) | — |" in text
    text = repeat_runs.summarize(["a"], [study, adopted, rerun])
    assert "307.7 (EPYC, 1 thr, study = g1); 305.0 (EPYC, 1 thr, g2) | 2.7 |" in text


def test_cpu_tag_names_vendor_family_and_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
                    "model name\t: AMD EPYC\nprocessor\t: 1\ncpu family\t: 26\nmodel\t\t: 2\n")
    real = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: real(info if str(self) == "/proc/cpuinfo" else self,
                                                                       *a, **k))
    assert results_md.cpu_tag() == "amd-epyc-f26m2"
    info.write_text("cpu family\t: 6\nmodel\t\t: 143\nmodel name\t: Intel(R) Xeon(R) Processor @ 2.1GHz\n")
    assert results_md.cpu_tag() == "intel-xeon-f6m143"


def log(path: Path, steps: dict[int, float]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    lines = [{"setup_seconds": 1.0, "time": 0.0}] + [{"epoch": 1, "step": s, "loss": v, "grad_norm": 1.0}
                                                     for s, v in steps.items()]
    (path / "log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_same_numerics_counts_identical_steps_and_rejects_any_difference(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    reference = log(tmp_path / "ref", {10: 11.1, 20: 9.3, 30: 8.1, 40: 7.0})
    fresh = {10: 11.1, 20: 9.3, 30: 8.1}

    class FakeTraining:  # stands in for train.py: writes its log at once and "runs" until terminated
        def __init__(self, cmd: list[str], **_: object) -> None:
            log(Path(cmd[cmd.index("--output-dir") + 1]), fresh)

        def poll(self) -> None:
            return None

        def terminate(self) -> None:
            pass

        def wait(self) -> int:
            return 0

    monkeypatch.setattr(repeat_runs.subprocess, "Popen", FakeTraining)
    recipe = next(iter(repeat_runs.RECIPES))
    assert repeat_runs.same_numerics(recipe, 0, 1, "data", reference, steps=30) == 30
    fresh = {10: 11.1, 20: 9.30001, 30: 8.1}
    assert repeat_runs.same_numerics(recipe, 0, 1, "data", reference, steps=30) == 0


def test_the_first_recipe_is_compared_with_each_other_one() -> None:
    runs = [run("a", 0, "g1", 310.0), run("b", 0, "g1", 308.0), run("c", 0, "g1", 290.0)]
    text = repeat_runs.summarize(["a", "b", "c"], runs)
    assert "Margin of `a` over `b`" in text and "| g1 | s0 +2.0 | +2.0 | — | 1/1 |" in text
    assert "Margin of `a` over `c`" in text and "| g1 | s0 +20.0 | +20.0 | — | 1/1 |" in text


def test_each_budget_compares_its_hierarchical_recipe_with_its_controls_and_a_longer_budget_with_the_study_s() -> None:
    v11, flat, dual = repeat_runs.DEFAULT_RECIPE, repeat_runs.FLAT, "dual-views2-text1"
    ordered, pairs = repeat_runs.comparisons([f"{flat}-e6", v11, flat, dual, f"{v11}-e6"])
    assert ordered == [v11, flat, dual, f"{v11}-e6", f"{flat}-e6"]  # study budget first; tshsr before its controls
    assert pairs == [(v11, flat), (v11, dual), (f"{v11}-e6", f"{flat}-e6"), (f"{v11}-e6", v11), (f"{flat}-e6", flat)]
    assert repeat_runs.budget_of(f"{v11}-e6")[:4] == ["--epochs", "6", "--lr-update", "4"]
    runs = [run(v11, 0, "g1", 306.4), run(f"{v11}-e6", 0, "g1", 309.0), run(flat, 0, "g1", 307.5)]
    text = repeat_runs.summarize(ordered, runs, pairs)
    assert f"Margin of `{v11}-e6` over `{v11}`" in text and "| g1 | s0 +2.6 | +2.6 | — | 1/1 |" in text
    assert f"Margin of `{v11}` over `{flat}`" in text and "| g1 | s0 -1.1 | -1.1 | — | 0/1 |" in text


def test_a_second_hierarchical_recipe_is_compared_with_the_default_and_the_controls() -> None:
    v11, flat, dual = repeat_runs.DEFAULT_RECIPE, repeat_runs.FLAT, "dual-views2-text1"
    other = "detach-skip-separate-windows-i2tctx-layer0-views2-text1"
    ordered, pairs = repeat_runs.comparisons([other, v11, flat, dual])
    assert pairs == [(v11, flat), (v11, dual), (other, flat), (other, dual), (other, v11)]


def test_another_backbone_is_compared_with_its_own_controls_and_with_the_same_recipe_on_the_default_one() -> None:
    v11, flat, dual = repeat_runs.DEFAULT_RECIPE, repeat_runs.FLAT, "dual-views2-text1"
    lite2 = [f"{v11}-lite2", f"{flat}-lite2", f"{dual}-lite2"]
    ordered, pairs = repeat_runs.comparisons([*lite2, v11, flat, dual])
    assert ordered == [v11, flat, dual, *lite2]  # the default backbone first; each backbone's tshsr before its controls
    assert pairs == [(v11, flat), (v11, dual), (lite2[0], lite2[1]), (lite2[0], lite2[2]),  # never across backbones,
                     (lite2[0], v11), (lite2[1], flat), (lite2[2], dual)]  # but each recipe against its Lite0 self
