"""benchmarks/app_reliability.py, small: bad input and a short concurrent load against `python app.py`.

The full run (29 bad inputs, 16 clients x 20 requests) is `python benchmarks/app_reliability.py`;
here 4 bad inputs and 4 clients x 3 requests keep it within about a minute.
"""

from __future__ import annotations

import sys

import pytest
from PIL import Image

pytest.importorskip("gradio_client")
pytest.importorskip("psutil")

from benchmarks import app_reliability as ar  # noqa: E402

pytestmark = pytest.mark.app

MODEL = ar.DEFAULT_MODEL
HAVE_MODEL = (MODEL / "config.json").is_file() and (MODEL / "model.safetensors").is_file()
SMALL_CASES = ["corrupt bytes", "decompression bomb (30000 x 30000 PNG)", "empty text",
               "pasted pool of 20,000 captions"]


def test_png_bomb_is_small_on_disk_and_huge_in_its_header(tmp_path) -> None:
    path = ar.write_png_bomb(tmp_path / "bomb.png", 30_000)
    assert path.stat().st_size < 300_000
    Image.MAX_IMAGE_PIXELS, old = None, Image.MAX_IMAGE_PIXELS
    try:
        with Image.open(path) as image:  # the header only; nothing is decoded
            assert image.size == (30_000, 30_000) and image.mode == "1"
    finally:
        Image.MAX_IMAGE_PIXELS = old


def test_log_watch_ignores_gradio_refusals_and_reports_other_exceptions(tmp_path) -> None:
    log = tmp_path / "app.log"
    log.write_text("Traceback (most recent call last):\n  File \"x\"\n"
                   "tshsr.processing.InvalidInputError: Type a caption\n\n"
                   "The above exception was the direct cause of the following exception:\n\n"
                   "Traceback (most recent call last):\n  File \"y\"\ngradio.exceptions.Error: 'Type a caption'\n"
                   "2026-01-01 10:00:00,000 INFO httpx: HTTP Request: GET / \"HTTP/1.1 200 OK\"\n")
    watch = ar.LogWatch(log)
    assert watch.new_problems() == []
    with log.open("a") as f:
        f.write("Traceback (most recent call last):\n  File \"z\"\nValueError: boom\n"
                "2026-01-01 10:00:01,000 ERROR tshsr.app: request failed:\n")
    problems = watch.new_problems()
    assert "ValueError: boom" in problems and "request failed" in problems
    with log.open("a") as f:  # Gradio refusing a path it did not receive as an upload, or bad FileData
        f.write("gradio.exceptions.InvalidPathError: Cannot move /etc/hostname to the gradio cache dir\n"
                "pydantic_core._pydantic_core.ValidationError: 1 validation error for FileData\n"
                "pydantic_core._pydantic_core.ValidationError: 1 validation error for Settings\n")
    assert watch.new_problems() == ["pydantic_core._pydantic_core.ValidationError: 1 validation error for Settings"]
    assert watch.new_problems() == []  # only new lines count


def test_every_named_case_exists_and_the_list_covers_the_issue() -> None:
    names = {c.name for c in ar.bad_input_cases()}
    assert set(SMALL_CASES) <= names
    assert len(names) == len(ar.bad_input_cases()) >= 26
    with pytest.raises(ValueError, match="unknown"):
        ar.measure(case_names=["no such case"])


def test_queue_settings_are_read_from_app_py() -> None:
    settings = ar.app_queue_settings()
    assert isinstance(settings["--concurrency"], int) and settings["--concurrency"] >= 1
    assert isinstance(settings["--queue-size"], int) and settings["--queue-size"] >= 1
    assert settings["max_upload"].endswith("mb")


@pytest.mark.skipif(not HAVE_MODEL, reason=f"no trained model at {MODEL} (the bundled demo checkpoint); "
                                           "the app reliability check needs it")
def test_small_reliability_run_handles_bad_input_and_serves_all_concurrent_requests() -> None:
    report = ar.measure(clients=4, requests_per_client=3, total_timeout_s=120, warmup=2, case_names=SMALL_CASES)
    bad = {o["name"]: o for o in report["bad_inputs"]}
    assert set(bad) == set(SMALL_CASES)
    for name, outcome in bad.items():
        assert outcome["handled"], (name, outcome)
        assert outcome["got"] == "error" and outcome["as_documented"], (name, outcome)
        assert outcome["good_after"], f"a good request after {name!r} failed"
    assert "too large" in bad["decompression bomb (30000 x 30000 PNG)"]["message"]
    assert "limit" in bad["pasted pool of 20,000 captions"]["message"]

    load = report["load"]
    assert load["served"] == 12 and load["failed"] == 0, load["errors"]
    assert set(load["latency_s"]) == {"/rank_images", "/rank_captions"}
    assert report["load_log_problems"] == [] and report["alive_after_load"]
    assert report["warmup_served"] == 2
    assert report["rss_after_warmup"] > 0 and report["rss_after_load"] > 0

    summary = ar.summarize(report)
    assert summary["handled (a result or a readable error, no server traceback)"] == "4 of 4"
    assert summary["good requests after bad ones succeeded"] == "4 of 4"
    assert summary["load requests"].startswith("12 served, 0 failed of 12")
    assert all(isinstance(v, str) and "\n" not in v for v in summary.values())


def test_app_caps_malloc_arenas_unless_the_user_set_them(monkeypatch) -> None:
    import app

    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert app.limit_malloc_arenas(2) is False  # the user's setting wins
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").mallopt
        except (OSError, AttributeError):
            pytest.skip("not glibc")
        assert app.limit_malloc_arenas(2) is True
