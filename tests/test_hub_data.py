"""Hub datasets offline: fixtures laid out exactly like the Hub repositories.

``$TSHSR_HUB_MIRROR/<owner>/<name>`` stands for a repository's main branch and
``<owner>/<name>@refs%2Fconvert%2Fparquet`` for its Parquet conversion, so the loader runs the
same code as online (list files, detect a script repository, read the conversion's parquet
files through ``datasets``); only the file locations differ.

* nlphuji/flickr30k, main: ``flickr30k.py`` (a loading script) + README; its conversion:
  ``TEST/test/0000.parquet`` ... with columns image, caption (list), sentids (list), split,
  img_id, filename, one dataset split ``test`` holding every row, Karpathy split in ``split``.
* yerevann/coco-karpathy, main: ``data/{train,restval,validation,test}-00000-of-00001.parquet``
  with columns filepath, sentids, filename, imgid, split, sentences (list), cocoid, url.
"""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from tshsr import data as data_module
from tshsr import hub_data
from tshsr.data import load_split, load_split_from_args

datasets = pytest.importorskip("datasets")

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (250, 250, 0), (0, 250, 250)]
F30K_SPLITS = ["train", "train", "val", "test", "test"]
F30K_CAPTIONS = [[f"image {i} caption {k}" for k in range(5)] for i in range(5)]


def _png(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (10, 8), color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture()
def mirror(tmp_path: Path, monkeypatch) -> Path:
    root = tmp_path / "hub"
    monkeypatch.setenv(hub_data.MIRROR_ENV, str(root))
    return root


def _write_flickr30k(mirror: Path) -> None:
    main = mirror / "nlphuji" / "flickr30k"
    main.mkdir(parents=True)
    (main / "flickr30k.py").write_text("import datasets\n# the loading script datasets>=4 refuses\n")
    (main / "README.md").write_text("---\nlicense: other\n---\n")
    (main / ".gitattributes").write_text("*.parquet filter=lfs\n")
    # As on the Hub, the script's data sit beside it (a zip of the images and a CSV).
    (main / "flickr30k-images.zip").write_bytes(b"PK\x05\x06" + b"\0" * 18)
    (main / "flickr_annotations_30k.csv").write_text("raw,sentids,split,filename,img_id\n")
    conversion = mirror / "nlphuji" / "flickr30k@refs%2Fconvert%2Fparquet" / "TEST" / "test"
    conversion.mkdir(parents=True)
    (conversion.parent.parent / ".gitattributes").write_text("*.parquet filter=lfs\n")
    features = datasets.Features({
        "image": datasets.Image(),
        "caption": datasets.List(datasets.Value("string")),
        "sentids": datasets.List(datasets.Value("string")),
        "split": datasets.Value("string"),
        "img_id": datasets.Value("string"),
        "filename": datasets.Value("string"),
    })
    # Two shards, as the converter writes them (0000.parquet, 0001.parquet, ...).
    for shard, rows in enumerate(([0, 1, 2], [3, 4])):
        table = {
            "image": [{"bytes": _png(COLORS[i]), "path": None} for i in rows],
            "caption": [F30K_CAPTIONS[i] for i in rows],
            "sentids": [[str(5 * i + k) for k in range(5)] for i in rows],
            "split": [F30K_SPLITS[i] for i in rows],
            "img_id": [str(i) for i in rows],
            "filename": [f"{1000 + i}.jpg" for i in rows],
        }
        datasets.Dataset.from_dict(table, features=features).to_parquet(str(conversion / f"{shard:04d}.parquet"))


COCO_PARTS = {"train": [0, 1], "restval": [2], "validation": [3], "test": [4]}


def _write_coco(mirror: Path) -> None:
    main = mirror / "yerevann" / "coco-karpathy"
    (main / "data").mkdir(parents=True)
    (main / "README.md").write_text("---\nlanguage:\n- en\npretty_name: COCO Karpathy split\n---\n")
    features = datasets.Features({
        "filepath": datasets.Value("string"),
        "sentids": datasets.List(datasets.Value("int32")),
        "filename": datasets.Value("string"),
        "imgid": datasets.Value("int32"),
        "split": datasets.Value("string"),
        "sentences": datasets.List(datasets.Value("string")),
        "cocoid": datasets.Value("int32"),
        "url": datasets.Value("string"),
    })
    for name, rows in COCO_PARTS.items():
        folder = "train2014" if name == "train" else "val2014"
        table = {
            "filepath": [folder for _ in rows],
            "sentids": [[10 * i, 10 * i + 1] for i in rows],
            "filename": [f"COCO_{folder}_{i:012d}.jpg" for i in rows],
            "imgid": rows,
            "split": ["val" if name == "validation" else name for _ in rows],
            "sentences": [[f"coco {i} a", f"coco {i} b"] for i in rows],
            "cocoid": [500 + i for i in rows],
            "url": [f"http://images.cocodataset.org/{folder}/COCO_{folder}_{i:012d}.jpg" for i in rows],
        }
        path = main / "data" / f"{name}-00000-of-00001.parquet"
        datasets.Dataset.from_dict(table, features=features).to_parquet(str(path))


# ----------------------------------------------------------------------------------------------
# Script repositories: detection, the one-line notice, the Parquet conversion
# ----------------------------------------------------------------------------------------------
def test_script_repo_detection_from_file_lists() -> None:
    hub_files = [".gitattributes", "README.md", "flickr30k-images.zip", "flickr30k.py", "flickr_annotations_30k.csv"]
    assert hub_data.is_script_repo(hub_files, "nlphuji/flickr30k")  # data beside the script: still refused
    assert not hub_data.is_script_repo(["tools.py", "data/train-00000-of-00001.parquet"], "someone/captions")
    assert hub_data.is_script_repo(["flickr30k.py", "README.md", ".gitattributes"])
    assert not hub_data.is_script_repo(["README.md", "data/train-00000-of-00001.parquet"])
    # A helper .py beside real data files is not a loading-script repository.
    assert not hub_data.is_script_repo(["convert.py", "data/test-00000-of-00001.parquet"])
    assert not hub_data.is_script_repo(["README.md"])


def test_parquet_conversion_layout() -> None:
    files = [".gitattributes", "TEST/test/0001.parquet", "TEST/test/0000.parquet", "TEST/test/index.duckdb"]
    assert hub_data.parquet_conversion_data_files(files) == (
        "TEST", {"test": ["TEST/test/0000.parquet", "TEST/test/0001.parquet"]})
    partial = ["default/partial-train/0000.parquet", "default/restval/0000.parquet", "other/train/0000.parquet"]
    config, splits = hub_data.parquet_conversion_data_files(partial)
    assert config == "default" and splits == {"restval": ["default/restval/0000.parquet"],
                                              "train": ["default/partial-train/0000.parquet"]}
    with pytest.raises(ValueError, match="several configs"):
        hub_data.parquet_conversion_data_files(["a/train/0000.parquet", "b/train/0000.parquet"])
    with pytest.raises(ValueError, match="No config 'x'"):
        hub_data.parquet_conversion_data_files(partial, config="x")


def test_flickr30k_script_repo_reads_parquet_conversion(mirror: Path, capsys) -> None:
    _write_flickr30k(mirror)
    test = load_split("flickr30k", "test")
    notice = [line for line in capsys.readouterr().err.splitlines() if "refs/convert/parquet" in line]
    assert len(notice) == 1 and "nlphuji/flickr30k" in notice[0] and "loading-script" in notice[0]
    # Rows come from both shards; the Karpathy split is the split column.
    assert test.image_ids == ["1003", "1004"] and test.name == "flickr30k/test"
    assert test.captions == F30K_CAPTIONS[3] + F30K_CAPTIONS[4]
    assert test.caption_image.tolist() == [0] * 5 + [1] * 5
    assert test.image(1).getpixel((2, 2)) == COLORS[4]
    assert test.source == "flickr30k"  # same fingerprint source as a save_to_disk copy
    train = load_split("flickr30k", "train", max_images=1)
    assert train.image_ids == ["1000"] and train.image(0).getpixel((0, 0)) == COLORS[0]
    assert load_split("flickr30k", "validation").image_ids == ["1002"]


def test_script_error_from_datasets_triggers_the_fallback(mirror: Path, monkeypatch, capsys) -> None:
    """When the file list cannot tell (e.g. listing failed), datasets' own refusal decides."""
    _write_flickr30k(mirror)
    monkeypatch.setattr(hub_data, "is_script_repo", lambda files, repo=None: False)
    raised: list[BaseException] = []
    real_load = datasets.load_dataset

    def recording_load(path, *args, **kwargs):
        try:
            return real_load(path, *args, **kwargs)
        except Exception as exc:
            raised.append(exc)
            raise

    monkeypatch.setattr(datasets, "load_dataset", recording_load)
    loaded = hub_data.load_hub_dataset("nlphuji/flickr30k")
    # The genuine datasets error (the mirror folder holds flickr30k.py) was caught and handled.
    assert len(raised) == 1 and isinstance(raised[0], RuntimeError) and hub_data.is_script_error(raised[0])
    assert list(loaded) == ["test"] and loaded["test"].num_rows == 5
    assert capsys.readouterr().err.count(hub_data.PARQUET_REVISION) == 1


def test_other_load_errors_are_not_swallowed(mirror: Path, monkeypatch) -> None:
    _write_flickr30k(mirror)
    monkeypatch.setattr(hub_data, "is_script_repo", lambda files, repo=None: False)

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(datasets, "load_dataset", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        hub_data.load_hub_dataset("nlphuji/flickr30k")


def test_missing_mirror_repo_is_a_clear_error(mirror: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nobody/nothing"):
        hub_data.load_hub_dataset("nobody/nothing")


# ----------------------------------------------------------------------------------------------
# COCO Karpathy from the Hub layout
# ----------------------------------------------------------------------------------------------
def test_coco_hub_layout_train_restval_and_urls(mirror: Path, monkeypatch, capsys) -> None:
    _write_coco(mirror)
    fetched: list[str] = []
    monkeypatch.setattr(data_module, "_fetch_url", lambda url: fetched.append(url) or _png(COLORS[0]))
    train = load_split("coco", "train")
    assert "refs/convert/parquet" not in capsys.readouterr().err  # a parquet repo: no fallback
    assert train.image_ids == ["500", "501", "502"]  # restval (a non-standard split name) joins train
    assert train.captions[:2] == ["coco 0 a", "coco 0 b"]
    assert fetched == []
    train.image(2)
    assert fetched == ["http://images.cocodataset.org/val2014/COCO_val2014_000000000002.jpg"]
    assert load_split("coco", "validation").image_ids == ["503"]


def test_coco_hub_layout_with_image_root(mirror: Path, tmp_path: Path) -> None:
    _write_coco(mirror)
    root = tmp_path / "coco_images"
    (root / "val2014").mkdir(parents=True)
    Image.new("RGB", (6, 6), COLORS[4]).save(root / "val2014" / "COCO_val2014_000000000004.jpg", format="PNG")
    test = load_split("coco", "test", image_root=str(root))
    assert test.image_refs == [str(root / "val2014" / "COCO_val2014_000000000004.jpg")]
    assert test.image(0).getpixel((3, 3)) == COLORS[4]


# ----------------------------------------------------------------------------------------------
# Any repository: --hf-dataset / --columns
# ----------------------------------------------------------------------------------------------
def _write_one_caption_per_row(mirror: Path) -> None:
    """captions one per row, grouped by an id column; rows of image 1 are not adjacent."""
    main = mirror / "someone" / "captions"
    (main / "data").mkdir(parents=True)
    features = datasets.Features({"img": datasets.Image(), "text": datasets.Value("string"),
                                  "pic": datasets.Value("int64")})
    ids = [7, 7, 8, 9, 8]
    table = {"img": [{"bytes": _png(COLORS[i % 5]), "path": None} for i in ids],
             "text": [f"t{k}" for k in range(len(ids))], "pic": ids}
    datasets.Dataset.from_dict(table, features=features).to_parquet(str(main / "data" / "train-00000-of-00001.parquet"))


def test_generic_repo_one_caption_per_row(mirror: Path) -> None:
    _write_one_caption_per_row(mirror)
    split = load_split("imagefolder", "train", hf_dataset="someone/captions", columns="image=img,caption=text,image_id=pic")
    assert split.image_ids == ["7", "8", "9"]
    assert [split.captions_of(i) for i in range(3)] == [["t0", "t1"], ["t2", "t4"], ["t3"]]
    assert split.image(1).getpixel((0, 0)) == COLORS[8 % 5]
    assert split.source == "hf:someone/captions"
    two = load_split("imagefolder", "train", hf_dataset="someone/captions", max_images=2,
                     columns="image=img,caption=text,image_id=pic")
    assert two.image_ids == ["7", "8"] and two.captions_of(1) == ["t2", "t4"]  # late caption still joins
    with pytest.raises(ValueError, match="no split 'test'"):
        load_split("imagefolder", "test", hf_dataset="someone/captions", columns="image=img,caption=text")


def test_generic_repo_with_split_column_on_a_script_repo(mirror: Path) -> None:
    _write_flickr30k(mirror)
    split = load_split("imagefolder", "validation", hf_dataset="nlphuji/flickr30k", columns="split=split,image_id=filename")
    assert split.image_ids == ["1002.jpg"] and split.captions == F30K_CAPTIONS[2]
    assert split.image(0).getpixel((1, 1)) == COLORS[2]


def test_columns_spec_errors(mirror: Path) -> None:
    assert hub_data.parse_columns("image=img, caption=text") == {"image": "img", "caption": "text"}
    with pytest.raises(ValueError, match="unknown key"):
        hub_data.parse_columns("picture=img")
    with pytest.raises(ValueError, match="key=column"):
        hub_data.parse_columns("img")
    _write_one_caption_per_row(mirror)
    with pytest.raises(ValueError, match="caption=nope is not a column"):
        load_split("imagefolder", "train", hf_dataset="someone/captions", columns="caption=nope")


# ----------------------------------------------------------------------------------------------
# Streaming
# ----------------------------------------------------------------------------------------------
def test_streaming_matches_download_for_the_first_images(mirror: Path) -> None:
    _write_flickr30k(mirror)
    full = load_split("flickr30k", "train")
    streamed = load_split("flickr30k", "train", streaming=True, max_images=1)
    assert streamed.image_ids == full.image_ids[:1] and streamed.captions == full.captions_of(0)
    assert streamed.image(0).getpixel((0, 0)) == COLORS[0]
    _write_coco(mirror)
    coco = load_split("coco", "train", streaming=True, max_images=3)
    assert coco.image_ids == ["500", "501", "502"]
    _write_one_caption_per_row(mirror)
    generic = load_split("imagefolder", "train", hf_dataset="someone/captions", streaming=True, max_images=1,
                         columns="image=img,caption=text,image_id=pic")
    assert generic.image_ids == ["7"] and generic.captions == ["t0", "t1"]


def test_materialise_stops_reading_after_max_images() -> None:
    read: list[int] = []

    def rows():
        for i in range(1000):
            read.append(i)
            yield {"image": {"bytes": _png(COLORS[i % 5]), "path": None}, "caption": f"c{i}", "split": "test" if i % 2 else "train"}

    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string"),
                                  "split": datasets.Value("string")})
    iterable = datasets.IterableDataset.from_generator(rows, features=features)
    out = hub_data.materialise(iterable, 3, keep=lambda row: row["split"] == "test")
    assert out["caption"] == ["c1", "c3", "c5"]
    assert len(read) < 20  # streamed, not downloaded: stops right after the 4th matching row
    assert out.features["image"].decode is False


def test_load_split_from_args_passes_hub_options(mirror: Path) -> None:
    _write_one_caption_per_row(mirror)
    args = SimpleNamespace(dataset="imagefolder", data_dir=None, image_root=None, hf_dataset="someone/captions",
                           hf_revision=None, columns="image=img,caption=text,image_id=pic", streaming=False)
    assert load_split_from_args(args, "train", max_images=2).image_ids == ["7", "8"]


# ----------------------------------------------------------------------------------------------
# COCO image download (python -m tshsr.download_coco) against a local HTTP server
# ----------------------------------------------------------------------------------------------
def _jpeg(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), color).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


@pytest.fixture()
def image_server(monkeypatch):
    """Serves /<folder>/<file>.jpg; 'flaky' paths fail once with 503, 'corrupt' ones are not JPEGs."""
    import http.server
    import threading

    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    state = {"files": {}, "requests": [], "flaky": set()}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            state["requests"].append(self.path)
            if self.path in state["flaky"]:
                state["flaky"].discard(self.path)
                self.send_error(503, "busy, try again")
                return
            body = state["files"].get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state["base"] = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()


def _serve_coco(mirror: Path, server: dict) -> dict[str, bytes]:
    """The coco-karpathy fixture, its URLs pointing at the local server."""
    import pyarrow.parquet as pq

    _write_coco(mirror)
    served = {}
    for path in sorted((mirror / "yerevann" / "coco-karpathy" / "data").glob("*.parquet")):
        table = pq.read_table(path)
        urls = [u.replace("http://images.cocodataset.org", server["base"]) for u in table.column("url").to_pylist()]
        index = table.schema.get_field_index("url")
        table = table.set_column(index, table.schema.field(index), pyarrow_array(urls))
        pq.write_table(table, path)
        for url, cocoid in zip(urls, table.column("cocoid").to_pylist()):
            rel = url[len(server["base"]):]
            served[rel] = _jpeg(COLORS[(cocoid - 500) % 5])
    server["files"].update(served)
    return served


def pyarrow_array(values):
    import pyarrow as pa

    return pa.array(values, type=pa.string())


def test_download_retries_verifies_resumes_and_feeds_image_root(mirror: Path, image_server, tmp_path: Path, capsys) -> None:
    from tshsr import download_coco

    served = _serve_coco(mirror, image_server)
    train_paths = sorted(p for p in served if "train2014" in p)
    image_server["flaky"].add(train_paths[0])  # fails once: the retry round must fetch it
    output = tmp_path / "coco_images"
    code = download_coco.main(["--output", str(output), "--split", "all", "--workers", "4", "--no-progress"])
    assert code == 0
    assert image_server["requests"].count(train_paths[0]) == 2
    manifest = download_coco._read_manifest(output / download_coco.MANIFEST)
    assert sorted(manifest) == sorted(p.lstrip("/") for p in served)
    import hashlib

    for rel, entry in manifest.items():
        data = (output / rel).read_bytes()
        assert entry["size"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert "--image-root" in capsys.readouterr().out

    # Resume: nothing complete is fetched again.
    before = len(image_server["requests"])
    report = download_coco.download_images(download_coco.coco_image_items("all"), output, progress=False)
    assert report.ok and len(report.skipped) == 5 and report.downloaded == []
    assert len(image_server["requests"]) == before

    # The cache is what --image-root reads: no URL is touched.
    split = load_split("coco", "train", image_root=str(output))
    assert split.image_ids == ["500", "501", "502"]
    assert all(Path(ref).is_file() for ref in split.image_refs)
    green = COLORS[1]
    assert max(abs(a - b) for a, b in zip(split.image(1).getpixel((8, 6)), green)) < 8  # JPEG, near exact


def test_download_lists_corrupt_and_missing_files_and_checks_checksums(image_server, tmp_path: Path, capsys) -> None:
    from tshsr import download_coco

    base = image_server["base"]
    good, corrupt = _jpeg(COLORS[0]), b"<html>not an image</html>"
    image_server["files"].update({"/val2014/good.jpg": good, "/val2014/corrupt.jpg": corrupt})
    items = [("val2014/good.jpg", f"{base}/val2014/good.jpg"), ("val2014/corrupt.jpg", f"{base}/val2014/corrupt.jpg"),
             ("val2014/gone.jpg", f"{base}/val2014/gone.jpg")]
    output = tmp_path / "out"
    report = download_coco.download_images(items, output, workers=2, retries=1, retry_wait=0, progress=False)
    assert report.downloaded == ["val2014/good.jpg"]
    assert sorted(report.failed) == ["val2014/corrupt.jpg", "val2014/gone.jpg"]
    assert "not a readable image" in report.failed["val2014/corrupt.jpg"]
    assert "404" in report.failed["val2014/gone.jpg"]
    assert image_server["requests"].count("/val2014/corrupt.jpg") == 2  # tried, then retried once
    assert not (output / "val2014" / "corrupt.jpg").exists()  # a bad file never lands in the cache
    listed = (output / download_coco.FAILURES).read_text()
    assert "val2014/corrupt.jpg" in listed and "val2014/gone.jpg" in listed

    # A known checksum that does not match is a failure, and the file is not written.
    report = download_coco.download_images(items[:1], tmp_path / "checked", retries=0, progress=False,
                                           expected_sha256={"val2014/good.jpg": "0" * 64})
    assert "does not match" in report.failed["val2014/good.jpg"]
    assert not (tmp_path / "checked" / "val2014" / "good.jpg").exists()

    # An existing COCO copy (files, no manifest) is verified and adopted without downloading.
    existing = tmp_path / "existing"
    (existing / "val2014").mkdir(parents=True)
    (existing / "val2014" / "good.jpg").write_bytes(good)
    before = len(image_server["requests"])
    report = download_coco.download_images(items[:1], existing, progress=False)
    assert report.skipped == ["val2014/good.jpg"] and len(image_server["requests"]) == before


def test_generic_repo_guesses_coco_columns_and_urls(mirror: Path, monkeypatch) -> None:
    """--hf-dataset on the coco-karpathy layout without --columns: url images, list captions."""
    _write_coco(mirror)
    fetched: list[str] = []
    monkeypatch.setattr(data_module, "_fetch_url", lambda url: fetched.append(url) or _png(COLORS[1]))
    split = load_split("imagefolder", "validation", hf_dataset="yerevann/coco-karpathy")
    assert split.image_ids == ["503"] and split.captions == ["coco 3 a", "coco 3 b"]
    assert split.image(0).getpixel((0, 0)) == COLORS[1]
    assert fetched == ["http://images.cocodataset.org/val2014/COCO_val2014_000000000003.jpg"]
