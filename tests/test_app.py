"""The demo app, launched as `python app.py` and driven through gradio_client over real HTTP.

One app process serves the whole module (start-up encodes the example gallery and caption pool
once, as in production). Every bad input must come back as an error with a message, and a good
request afterwards must still work.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.app_server import ROOT, find_model, running_app

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

MODEL, SKIP_REASON = find_model()
pytestmark = [pytest.mark.app, pytest.mark.skipif(MODEL is None, reason=SKIP_REASON)]

EXAMPLES = ROOT / "examples" / "images"
TOL = 1e-5


def _example_photo() -> Path:
    photos = sorted(p for p in EXAMPLES.glob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if not photos:
        pytest.skip(f"no example photos in {EXAMPLES}")
    return photos[0]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    log = tmp_path_factory.mktemp("app") / "app.log"
    with running_app(MODEL, log, extra_args=("--device", "cpu")) as url:  # --device cpu must work
        yield url


@pytest.fixture(scope="module")
def client(app_url):
    return Client(app_url, verbose=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Odd and broken inputs, made here."""
    d = tmp_path_factory.mktemp("inputs")
    out = {}
    out["zero_bytes"] = d / "empty.jpg"
    out["zero_bytes"].write_bytes(b"")
    out["corrupt"] = d / "corrupt.jpg"
    out["corrupt"].write_bytes(b"\xff\xd8\xff\xe0" + np.random.default_rng(0).bytes(2000))
    out["text"] = d / "notes.png"
    out["text"].write_text("this is not an image\n")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buf, "JPEG")
    out["truncated"] = d / "truncated.jpg"
    out["truncated"].write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    # Decompression bombs: a few hundred bytes on disk, 1.2x and 4x the pixel limit once decoded.
    for name, side in (("bomb_1x", 10_500), ("bomb_4x", 19_000)):
        out[name] = d / f"{name}.png"
        Image.new("1", (side, side)).save(out[name], optimize=True)
    out["too_big_upload"] = d / "big.png"  # over the app's 10 MB upload limit
    out["too_big_upload"].write_bytes(np.random.default_rng(1).bytes(11 * 1024 * 1024))
    # Odd but valid: each must be ranked.
    out["one_pixel"] = d / "one.png"
    Image.new("RGB", (1, 1), (200, 10, 10)).save(out["one_pixel"])
    out["cmyk"] = d / "cmyk.jpg"
    Image.new("CMYK", (80, 60), (0, 255, 255, 0)).save(out["cmyk"])
    out["sixteen_bit"] = d / "deep.png"
    Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16)).save(out["sixteen_bit"])
    out["animated"] = d / "anim.gif"
    frames = [Image.new("P", (40, 30), i * 40) for i in range(3)]
    frames[0].save(out["animated"], save_all=True, append_images=frames[1:], duration=100, loop=0)
    out["rgba"] = d / "alpha.png"
    Image.new("RGBA", (50, 50), (0, 0, 255, 80)).save(out["rgba"])
    return out


def _check_ranking(result: dict, top_k: int, item_key: str) -> None:
    rows = result["results"]
    assert len(rows) == top_k
    assert [r["rank"] for r in rows] == list(range(1, top_k + 1))
    scores = [r["score"] for r in rows]
    assert all(a >= b for a, b in zip(scores, scores[1:])), scores
    assert len({r[item_key] for r in rows}) == top_k, "an item is listed twice"
    for r in rows:
        assert set(r["contributions"]) == set(result["keys"])
        assert sum(r["contributions"].values()) == pytest.approx(r["score"], abs=TOL)
    json.dumps(result)  # JSON-able through and through


# ----------------------------------------------------------------------------------------------
def test_rank_captions_endpoint_returns_top_k_with_exact_breakdown(client) -> None:
    result = client.predict(handle_file(str(_example_photo())), "", 7, api_name="/rank_captions")
    _check_ranking(result, 7, "caption")
    keys = result["keys"]
    assert any(k.startswith("i2t/") for k in keys) or any(k.startswith("t2i/") for k in keys)
    assert all(r["source"] == "built-in" for r in result["results"])


def test_pasted_captions_join_the_pool_once(client) -> None:
    photo = handle_file(str(_example_photo()))
    base = client.predict(photo, "", 3, api_name="/rank_captions")
    pool_caption = base["results"][0]["caption"]
    pasted = f"a zebra plays chess on the moon\n\n  {pool_caption}\na zebra plays chess on the moon\nthree red kites"
    result = client.predict(photo, pasted, 50, api_name="/rank_captions")
    # Two new lines (a blank line, a duplicate and a pool caption add nothing).
    assert result["candidates"] == base["candidates"] + 2
    _check_ranking(result, 50, "caption")
    sources = {r["caption"]: r["source"] for r in result["results"]}
    assert sources.get(pool_caption) == "built-in"


def test_rank_images_endpoint_returns_top_k_with_exact_breakdown(client) -> None:
    result = client.predict("a dog running on the grass", 6, api_name="/rank_images")
    _check_ranking(result, 6, "image")
    assert all((EXAMPLES / r["image"]).is_file() for r in result["results"])


def test_both_endpoints_give_the_same_score_for_the_same_pair(client) -> None:
    photo = _example_photo()
    captions = client.predict(handle_file(str(photo)), "", 3, api_name="/rank_captions")
    caption, score = captions["results"][0]["caption"], captions["results"][0]["score"]
    images = client.predict(caption, 50, api_name="/rank_images")
    by_name = {r["image"]: r for r in images["results"]}
    assert photo.name in by_name, "the whole gallery (<= 50 photos) must be ranked"
    assert by_name[photo.name]["score"] == pytest.approx(score, abs=1e-4)
    assert by_name[photo.name]["contributions"] == pytest.approx(captions["results"][0]["contributions"], abs=1e-4)


def test_top_k_larger_than_the_gallery_returns_everything_once(client) -> None:
    first = client.predict("a boat on a lake", 1, api_name="/rank_images")
    n = first["candidates"]
    if n >= 50:
        pytest.skip("gallery has 50 or more photos")
    result = client.predict("a boat on a lake", 50, api_name="/rank_images")
    _check_ranking(result, n, "image")
    assert result["notes"], "a note must say why fewer than top_k came back"


@pytest.mark.parametrize("name", ["one_pixel", "cmyk", "sixteen_bit", "animated", "rgba"])
def test_odd_but_valid_images_are_ranked(client, files, name) -> None:
    result = client.predict(handle_file(str(files[name])), "a red square", 3, api_name="/rank_captions")
    _check_ranking(result, 3, "caption")


@pytest.mark.parametrize("text", ["🐶🐕🦴", "一只狗在草地上奔跑", "dog " * 30_000, "a\u200bdog\ton\x07grass"])
def test_unusual_text_is_ranked(client, text) -> None:
    result = client.predict(text, 4, api_name="/rank_images")
    _check_ranking(result, 4, "image")


BAD_CAPTION_REQUESTS = [
    ("zero_bytes", "", 5, "empty"),
    ("corrupt", "", 5, "not a readable image"),
    ("text", "", 5, "not a readable image"),
    ("truncated", "", 5, "not a readable image"),
    ("bomb_1x", "", 5, "too large"),
    ("bomb_4x", "", 5, "too large"),
    ("ok", "x\n" * 20_000, 5, "limit is 1,000"),
    ("ok", "", 0, "top_k"),
    ("ok", "", -3, "top_k"),
    ("ok", "", 10**9, "top_k"),
    ("ok", "", 2.5, "top_k"),
]


@pytest.mark.parametrize("name,captions,top_k,message", BAD_CAPTION_REQUESTS,
                         ids=[f"{r[0]}-{r[3]}-{i}" for i, r in enumerate(BAD_CAPTION_REQUESTS)])
def test_bad_rank_captions_requests_are_refused_with_a_message(client, files, name, captions, top_k, message):
    path = _example_photo() if name == "ok" else files[name]
    with pytest.raises(Exception) as info:
        client.predict(handle_file(str(path)), captions, top_k, api_name="/rank_captions")
    assert message.lower() in str(info.value).lower()
    assert str(files["corrupt"].parent) not in str(info.value), "server paths must not leak"


@pytest.mark.parametrize("text,top_k,message", [
    ("", 5, "type a caption"), ("   \n\t ", 5, "type a caption"), ("\x00\x01\x02", 5, "printable"),
    ("a dog", 0, "top_k"), ("a dog", -1, "top_k"), ("a dog", 1_000_000, "top_k"),
])
def test_bad_rank_images_requests_are_refused_with_a_message(client, text, top_k, message) -> None:
    with pytest.raises(Exception) as info:
        client.predict(text, top_k, api_name="/rank_images")
    assert message.lower() in str(info.value).lower()


def _upload(app_url: str, data: bytes, name: str) -> int:
    """POST one file to Gradio's upload route, as a browser does; returns the HTTP status."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(app_url + "gradio_api/upload", data=body,
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_upload_over_the_size_limit_is_refused(app_url, client, files) -> None:
    # The server itself refuses it (what a browser or any HTTP client meets) ...
    assert _upload(app_url, files["too_big_upload"].read_bytes(), "big.png") == 413
    assert _upload(app_url, b"small file", "small.png") == 200
    # ... and gradio_client reads the limit from the app and refuses before uploading.
    with pytest.raises(Exception, match="maximum file size"):
        client.predict(handle_file(str(files["too_big_upload"])), "", 5, api_name="/rank_captions")


def test_app_still_serves_after_bad_requests(client, files) -> None:
    for bad in ("zero_bytes", "corrupt", "bomb_4x"):
        with pytest.raises(Exception):
            client.predict(handle_file(str(files[bad])), "", 5, api_name="/rank_captions")
    with pytest.raises(Exception):
        client.predict("", 5, api_name="/rank_images")
    good = client.predict(handle_file(str(_example_photo())), "a photo", 5, api_name="/rank_captions")
    _check_ranking(good, 5, "caption")
    _check_ranking(client.predict("a photo", 5, api_name="/rank_images"), 5, "image")


def test_server_config_limits_upload_size(app_url) -> None:
    with urllib.request.urlopen(app_url + "config", timeout=10) as response:
        config = json.loads(response.read())
    assert config.get("max_file_size") == 10 * 1024 * 1024


def test_missing_model_is_a_clear_error_not_a_traceback(tmp_path) -> None:
    missing = tmp_path / "no-such-model"
    run = subprocess.run([sys.executable, str(ROOT / "app.py"), "--model", str(missing), "--port", "1"],
                         capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert run.returncode == 2
    assert "Model folder not found" in run.stderr and str(missing) in run.stderr
    assert "Traceback" not in run.stderr + run.stdout


def test_device_choice_follows_the_hardware(monkeypatch) -> None:
    import torch

    import app

    assert app.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert app.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        app.resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert app.resolve_device("auto") == torch.device("cuda")


def test_device_cuda_without_a_gpu_is_a_clear_error() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    run = subprocess.run([sys.executable, str(ROOT / "app.py"), "--model", str(MODEL), "--device", "cuda", "--port", "1"],
                         capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert run.returncode == 2
    assert "--device cuda" in run.stderr and "no CUDA GPU" in run.stderr
    assert "Traceback" not in run.stderr + run.stdout


def test_module_level_demo_is_built_on_first_use_only(tmp_path) -> None:
    """A Space looks for app.demo; importing app (as the tests do) must not load a model."""
    script = (
        "import sys, gradio as gr, app\n"
        "assert 'demo' not in vars(app), 'importing app built the demo'\n"
        "app.EXAMPLES_DIR = sys.argv[1]\n"
        "demo = app.demo\n"
        "assert isinstance(demo, gr.Blocks) and app.demo is demo and vars(app)['demo'] is demo\n"
        "print('launch defaults', sorted(demo.launch.keywords), demo.launch.keywords['max_file_size'])\n"
    )
    env = dict(os.environ, TSHSR_MODEL=str(MODEL), TSHSR_DEVICE="cpu", TSHSR_THREADS="1")
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "launch defaults ['allowed_paths', 'max_file_size', 'show_error'] 10mb" in run.stdout


def test_concurrent_requests_are_queued_and_all_answered(client) -> None:
    photo = handle_file(str(_example_photo()))
    expected_c = client.predict(photo, "", 3, api_name="/rank_captions")
    expected_i = client.predict("two people on a beach", 3, api_name="/rank_images")
    jobs = [client.submit(photo, "", 3, api_name="/rank_captions") if i % 2 == 0
            else client.submit("two people on a beach", 3, api_name="/rank_images") for i in range(6)]
    for i, job in enumerate(jobs):
        got = job.result(timeout=120)
        want = expected_c if i % 2 == 0 else expected_i
        assert [r["score"] for r in got["results"]] == pytest.approx([r["score"] for r in want["results"]], abs=1e-6)


# ----------------------------------------------------------------------------------------------
# The engine in-process: behaviour the public endpoints do not reach (session uploads, no examples)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bare_engine():
    """The app's engine without built-in examples: empty gallery and pool."""
    import app
    from tshsr import TSHSRModel

    return app.DemoEngine(TSHSRModel.from_pretrained(MODEL), "test", examples_dir=None, progress=False)


def test_app_without_examples_still_ranks_pasted_captions_and_added_photos(bare_engine, files, tmp_path) -> None:
    from tshsr import InvalidInputError

    engine = bare_engine
    assert len(engine.gallery) == 0 and engine.pool == []
    with pytest.raises(InvalidInputError, match="gallery is empty"):
        engine.rank_images("a dog", 3)
    with pytest.raises(InvalidInputError, match="No captions to rank"):
        engine.rank_captions(str(files["one_pixel"]), "", 3)
    ranked = engine.rank_captions(str(files["cmyk"]), "a red square\na blue circle\n\na red square", 5)
    assert ranked["candidates"] == 2 and len(ranked["results"]) == 2 and ranked["notes"]
    assert {r["source"] for r in ranked["results"]} == {"yours"}

    red = tmp_path / "red.png"
    Image.new("RGB", (64, 48), (230, 20, 20)).save(red)
    session, added, problems = engine.add_photos(None, [str(red), str(files["corrupt"]), str(red)])
    assert added == ["red.png"] and len(session) == 1
    assert any("corrupt.jpg" in p and "readable" in p for p in problems)
    assert any("already in your gallery" in p for p in problems)
    result = engine.rank_images("a red photo", 5, session)
    assert [r["source"] for r in result["results"]] == ["upload"] and result["candidates"] == 1
    assert Path(engine.image_path(result["results"][0]["image"], session)).is_file()
    # Another session does not see these photos.
    with pytest.raises(InvalidInputError, match="gallery is empty"):
        engine.rank_images("a red photo", 5, engine.new_session_gallery())


def test_session_upload_limit(bare_engine, tmp_path, monkeypatch) -> None:
    from tshsr_app import engine

    monkeypatch.setattr(engine, "MAX_SESSION_UPLOADS", 2)
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"p{i}.png")
        Image.new("RGB", (32, 32), (i * 80, 0, 0)).save(paths[-1])
    session, added, problems = bare_engine.add_photos(None, [str(p) for p in paths])
    assert len(added) == 2 and len(session) == 2
    assert len(problems) == 1 and "limit" in problems[0]


def test_pasted_captions_score_the_same_again_and_alone(bare_engine, files) -> None:
    lines = "a red square on white\na small photo\nsomething else entirely, a much longer caption than the rest"
    first = bare_engine.rank_captions(str(files["rgba"]), lines, 3)
    again = bare_engine.rank_captions(str(files["rgba"]), lines, 3)
    assert [r["caption"] for r in again["results"]] == [r["caption"] for r in first["results"]]
    assert [r["score"] for r in again["results"]] == pytest.approx([r["score"] for r in first["results"]], abs=1e-6)
    alone = bare_engine.rank_captions(str(files["rgba"]), "a small photo", 1)  # batched with nothing else
    by_caption = {r["caption"]: r["score"] for r in first["results"]}
    assert alone["results"][0]["score"] == pytest.approx(by_caption["a small photo"], abs=1e-5)
