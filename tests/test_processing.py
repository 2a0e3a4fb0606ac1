"""Preprocessing: every image mode becomes RGB, unusable files give a readable InvalidInputError,
texts are validated, the BiGRU vocabulary round-trips."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from tshsr import InvalidInputError, TSHSRConfig, TSHSRProcessor, Vocabulary
from tshsr.processing import MAX_IMAGE_PIXELS, MAX_TEXT_CHARS, load_image, validate_text, word_tokenize

SIZE = 24
MEAN = (0.5, 0.4, 0.3)
STD = (0.25, 0.2, 0.1)


@pytest.fixture(scope="module")
def processor(vocab) -> TSHSRProcessor:
    config = TSHSRConfig(image_encoder="timm", image_size=SIZE, image_mean=MEAN, image_std=STD,
                         text_encoder="bigru", vocab_size=len(vocab), max_text_length=8)
    return TSHSRProcessor(config, vocab)


def _bytes(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _ramp16() -> Image.Image:
    """A dark-to-bright 16-bit ramp, 0 .. 65535 left to right."""
    row = np.linspace(0, 65535, 64).round().astype(np.uint16)
    image = Image.fromarray(np.tile(row, (8, 1)))
    assert image.mode == "I;16"
    return image


def _palette_with_transparency() -> Image.Image:
    image = Image.new("P", (6, 4), 1)
    image.putpalette([0, 255, 0] + [255, 0, 0] + [0, 0, 0] * 254)  # index 0 green, 1 red
    image.paste(0, (0, 0, 3, 4))  # left half index 0 (made transparent), right half red
    image.info["transparency"] = 0
    return image


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=40, loop=0)
    return buffer.getvalue()


# (source, expected RGB of pixel (0, 0) or None when only the mode and size are checked)
IMAGE_CASES = {
    "L": (Image.new("L", (10, 6), 77), (77, 77, 77)),
    "LA-transparent": (Image.new("LA", (10, 6), (77, 0)), (255, 255, 255)),
    "LA-opaque": (Image.new("LA", (10, 6), (77, 255)), (77, 77, 77)),
    "1": (Image.new("1", (10, 6), 1), (255, 255, 255)),
    "P": (Image.new("P", (10, 6), 1), None),
    "P-transparency": (_palette_with_transparency(), (255, 255, 255)),
    "RGBA-transparent": (Image.new("RGBA", (10, 6), (255, 0, 0, 0)), (255, 255, 255)),
    "RGBA-half": (Image.new("RGBA", (10, 6), (255, 0, 0, 128)), (255, 127, 127)),
    "CMYK": (Image.new("CMYK", (10, 6), (0, 255, 0, 0)), (255, 0, 255)),
    "CMYK-jpeg": (_bytes(Image.new("CMYK", (10, 6), (0, 255, 0, 0)), "JPEG", quality=95), (255, 0, 255)),
    "I;16": (_ramp16(), (0, 0, 0)),
    "I;16-png": (_bytes(_ramp16(), "PNG"), (0, 0, 0)),
    "I": (Image.fromarray(np.arange(-50, 50, dtype=np.int32).reshape(10, 10)), (0, 0, 0)),
    "F": (Image.fromarray(np.linspace(-1, 1, 60, dtype=np.float32).reshape(6, 10)), (0, 0, 0)),
    "1x1": (Image.new("RGB", (1, 1), (1, 2, 3)), (1, 2, 3)),
    "1x1-png": (_bytes(Image.new("L", (1, 1), 200), "PNG"), (200, 200, 200)),
    "animated-gif": (_animated_gif(), (255, 0, 0)),  # the first frame
    "webp": (_bytes(Image.new("RGB", (10, 6), (10, 20, 30)), "WEBP", lossless=True), (10, 20, 30)),
}


@pytest.mark.parametrize("name", list(IMAGE_CASES))
def test_every_image_mode_becomes_rgb(name) -> None:
    source, expected = IMAGE_CASES[name]
    image = load_image(source)
    assert image.mode == "RGB"
    size = Image.open(io.BytesIO(source)).size if isinstance(source, bytes) else source.size
    assert image.size == size
    if expected is not None:
        assert all(abs(a - b) <= 2 for a, b in zip(image.getpixel((0, 0)), expected)), image.getpixel((0, 0))


def test_palette_transparency_keeps_opaque_colours() -> None:
    image = load_image(_palette_with_transparency())
    assert image.getpixel((0, 0)) == (255, 255, 255)  # transparent index: composited on white
    assert image.getpixel((5, 0)) == (255, 0, 0)  # opaque index keeps its palette colour


def test_animated_gif_uses_first_frame_even_after_seek() -> None:
    gif = Image.open(io.BytesIO(_animated_gif()))
    gif.seek(2)
    assert load_image(gif).getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize("source", [_ramp16(), _bytes(_ramp16(), "PNG")], ids=["image", "png"])
def test_16_bit_ramp_is_rescaled_not_clipped(source) -> None:
    row = np.asarray(load_image(source))[0]  # [64, 3]
    assert (row[:, 0] == row[:, 1]).all() and (row[:, 1] == row[:, 2]).all()
    values = row[:, 0].astype(int)
    assert (np.diff(values) >= 0).all(), "a dark-to-bright ramp must stay a ramp"
    assert values[0] == 0 and values[-1] == 255
    assert len(np.unique(values)) >= 60, "clipping at 255 would flatten the ramp"
    assert abs(int(values[32]) - 128) <= 3  # the middle of the 16-bit range is mid-grey


@pytest.mark.parametrize("mode, value, expected", [
    ("I;16", 65535, 255), ("I;16", 0, 0), ("I;16", 32896, 128),
    ("F", 200.0, 200), ("I", 255, 255),
])
def test_uniform_high_bit_depth_images_keep_their_level(mode, value, expected) -> None:
    """A flat 16-bit white image is white, not black (there is no range to stretch)."""
    source = Image.new(mode, (4, 4), value)
    pixel = load_image(source).getpixel((1, 1))
    assert all(abs(p - expected) <= 1 for p in pixel), pixel


def test_preprocess_every_mode(processor) -> None:
    sources = [source for source, _ in IMAGE_CASES.values()]
    pixels = processor.preprocess_images(sources)
    assert pixels.shape == (len(sources), 3, SIZE, SIZE)
    assert pixels.dtype == torch.float32 and torch.isfinite(pixels).all()
    # Normalised with the configured mean and std: a white image gives (1 - mean) / std.
    white = processor.preprocess_images([Image.new("RGB", (5, 9), (255, 255, 255))])[0]
    expected = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(white.mean((1, 2)), expected, atol=1e-5)
    # The whole picture is kept (resized, not cropped): a red left half stays on the left.
    half = Image.new("RGB", (40, 10), (0, 0, 255))
    half.paste((255, 0, 0), (0, 0, 20, 10))
    px = processor.preprocess_images([half])[0] * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
    assert px[0, :, : SIZE // 2 - 2].min() > 0.95 and px[0, :, SIZE // 2 + 2:].max() < 0.05


def test_preprocess_16_bit_ramp_stays_a_ramp(processor) -> None:
    pixels = processor.preprocess_images([_ramp16()])[0, 0]  # red channel, [S, S]
    row = pixels[SIZE // 2]
    assert (row[1:] - row[:-1] >= -1e-4).all() and row[-1] - row[0] > 3.0  # (1 - 0) / 0.25 = 4 apart


def test_preprocess_accepts_paths(processor, tmp_path) -> None:
    path = tmp_path / "grey.png"
    Image.new("L", (7, 3), 128).save(path)
    assert processor.preprocess_images([str(path), path]).shape == (2, 3, SIZE, SIZE)


# ----------------------------------------------------------------------------------------------
# Unusable images
# ----------------------------------------------------------------------------------------------
def _png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge size (a decompression bomb, cheap to build)."""
    data = bytearray(_bytes(Image.new("L", (1, 1)), "PNG"))
    ihdr = bytearray(data[16:29])  # IHDR payload: width, height, depth, colour, ...
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def test_corrupt_images_raise_readable_errors(tmp_path) -> None:
    jpeg = _bytes(Image.new("RGB", (64, 64), (10, 200, 30)), "JPEG")
    png = _bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "PNG")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("These are my holiday notes, not a picture.\n")
    (tmp_path / "half.png").write_bytes(png[: len(png) // 2])
    cases = [
        (b"", "Not a readable image"),
        (b"\x00" * 100, "Not a readable image"),
        (jpeg[:20], "Not a readable image"),
        (png[: len(png) // 2], "Not a readable image"),  # header fine, pixel data cut
        (jpeg[:2] + b"\xff" * 50 + jpeg[52:], "Not a readable image"),  # mangled JPEG
        (str(tmp_path / "empty.jpg"), "empty \\(0 bytes\\): empty.jpg"),
        (tmp_path / "notes.jpg", "Not a readable image.*notes.jpg"),
        (tmp_path / "half.png", "Not a readable image"),
        (tmp_path / "missing.png", "not found"),
        (_png_claiming_size(20_000, 20_000), "too large"),
    ]
    for source, message in cases:
        with pytest.raises(InvalidInputError, match=message):
            load_image(source)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_just_over_the_limit_is_refused() -> None:
    """Pillow only *warns* between 1x and 2x its limit; the library's limit must still hold."""
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 100  # just over the limit, under Pillow's hard 2x limit
    with pytest.raises(InvalidInputError, match="too large"):
        load_image(_png_claiming_size(side, side))


def test_preprocess_names_the_bad_image(processor) -> None:
    good = Image.new("RGB", (4, 4))
    with pytest.raises(InvalidInputError, match="Image #1: Not a readable image"):
        processor.preprocess_images([good, b"not an image", good])


# ----------------------------------------------------------------------------------------------
# Texts and the BiGRU vocabulary
# ----------------------------------------------------------------------------------------------
def test_validate_text() -> None:
    assert validate_text("  a dog\n") == "a dog"
    assert validate_text("a\x00dog") == "a dog"
    assert len(validate_text("dog " * 10_000)) == MAX_TEXT_CHARS
    for bad, message in [("", "Text #3 is empty"), ("   \t\n", "empty"), ("\x00\x07", "empty"),
                         (None, "NoneType, not a string"), (b"a dog", "bytes, not a string")]:
        with pytest.raises(InvalidInputError, match=message):
            validate_text(bad, 3)


def test_bigru_tokenize(processor, vocab) -> None:
    tok = processor.tokenize(["a dog", "The big red ZEBRA runs on grass again and again"])
    ids, word_mask = tok["input_ids"], tok["word_mask"]
    assert ids.shape == (2, 8)  # max_text_length truncates the long caption
    assert word_mask.sum(1).tolist() == [4, 8]  # <start> a dog <end>; the other is cut at 8
    assert (ids[~word_mask] == 0).all()
    assert ids[0, :4].tolist() == [vocab.stoi["<start>"], vocab.stoi["a"], vocab.stoi["dog"], vocab.stoi["<end>"]]
    assert ids[1, 4].item() == vocab.stoi["<unk>"]  # "zebra" is not in the vocabulary
    assert processor.tokens("a dog") == ["<start>", "a", "dog", "<end>"]
    with pytest.raises(InvalidInputError, match="Text #1 is empty"):
        processor.tokenize(["a dog", " "])


def test_vocabulary_round_trip(tmp_path, vocab) -> None:
    vocab.save(tmp_path)
    loaded = Vocabulary.load(tmp_path)
    assert loaded.itos == vocab.itos and len(loaded) == len(vocab)
    assert loaded.encode("a dog on the beach") == vocab.encode("a dog on the beach")
    built = Vocabulary.build(["A dog, a DOG!", "a cat"], min_count=2)
    assert built.itos[4:] == ["a", "dog"]
    assert word_tokenize("Don't STOP, 2 dogs!") == ["don't", "stop", "2", "dogs"]
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        Vocabulary.load(tmp_path / "nowhere")


def test_processor_refuses_wrong_setups(vocab) -> None:
    precomputed = TSHSRConfig(image_encoder="precomputed", image_feature_dim=8, text_encoder="bigru",
                              vocab_size=len(vocab))
    with pytest.raises(ValueError, match="precomputed region features"):
        TSHSRProcessor(precomputed, vocab).preprocess_images([Image.new("RGB", (4, 4))])
    with pytest.raises(ValueError, match="needs a Vocabulary"):
        TSHSRProcessor(precomputed)
