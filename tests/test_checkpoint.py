"""Checkpoints: save_pretrained -> from_pretrained gives the same model; anything tampered,
truncated or mismatched is refused with a CheckpointError that names the problem, never loaded
with random weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tshsr import CheckpointError, TSHSRModel

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


def _perturb(model: TSHSRModel, seed: int = 7) -> TSHSRModel:
    """Move every stored tensor off its initial value, as training would, so that a loader that
    silently kept a fresh initialisation could not pass for a working one."""
    gen = torch.Generator().manual_seed(seed)
    stored = model.saved_state_dict()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name in stored and tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=gen) * 0.05)
    return model


def _assert_clean_folder(folder: Path) -> None:
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors"} <= names
    for path in folder.iterdir():
        assert path.suffix not in PICKLE_SUFFIXES, path
        head = path.read_bytes()[:4]
        assert not head.startswith(b"\x80"), f"{path.name} is a pickle"
        assert not head.startswith(b"PK\x03\x04"), f"{path.name} is a zip (torch.save) archive"
    assert not list(folder.glob(".*.tmp")), "a temporary file was left behind"


def _same_state(a: TSHSRModel, b: TSHSRModel) -> None:
    sa, sb = a.saved_state_dict(), b.saved_state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# ----------------------------------------------------------------------------------------------
# 5. Round trips
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["tshsr", "saf"])
def test_bigru_round_trip(preset, make_model, regions, captions, vocab, tmp_path) -> None:
    model = _perturb(make_model(preset))
    before = model.score(regions, captions)
    model.save_pretrained(tmp_path / "ckpt")
    _assert_clean_folder(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "vocab.json").read_text()) == vocab.itos

    torch.manual_seed(1234)  # a different initialisation than the saved model's
    loaded = TSHSRModel.from_pretrained(tmp_path / "ckpt")
    assert not loaded.training
    assert loaded.config == model.config
    assert loaded.vocabulary.itos == vocab.itos
    _same_state(model, loaded)
    after = loaded.score(regions, captions)
    assert torch.equal(after.scores, before.scores)
    for key in before.contributions:
        assert torch.equal(after.contributions[key], before.contributions[key])


def test_real_backbone_round_trip(real_model, coffee_path, tmp_path) -> None:
    """Frozen pretrained backbones are referenced by name, not stored, and resolved again.
    (Perturbing the shared model's head is harmless: other tests use only its backbones.)"""
    _perturb(real_model)
    images = [coffee_path, str(coffee_path)]
    texts = ["a cup of coffee on a saucer", "two dogs on a beach"]
    before = real_model.score(images, texts).scores
    real_model.save_pretrained(tmp_path / "ckpt")
    _assert_clean_folder(tmp_path / "ckpt")
    stored = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert not [k for k in stored if k.startswith(("image_backbone.", "text_backbone."))]
    assert "image_proj.weight" in stored and "streams.t2i.level_logits" in stored
    loaded = TSHSRModel.from_pretrained(str(tmp_path / "ckpt"))
    _same_state(real_model, loaded)
    assert torch.equal(loaded.score(images, texts).scores, before)


def test_saved_metadata_and_overrides(make_model, regions, captions, tmp_path) -> None:
    model = make_model("tshsr")
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata()["tshsr_config_sha256"] == model.config.fingerprint()
    # Overrides that change no tensor (e.g. more reasoning steps) are applied on load.
    loaded = TSHSRModel.from_pretrained(tmp_path, reasoning_steps=4)
    assert loaded.config.reasoning_steps == 4
    assert (loaded.score(regions, captions).scores - model.score(regions, captions).scores).abs().max() > 1e-6


# ----------------------------------------------------------------------------------------------
# 6. Tampered and mismatched checkpoints
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory, make_model) -> Path:
    folder = tmp_path_factory.mktemp("saved") / "model"
    _perturb(make_model("tshsr")).save_pretrained(folder)
    return folder


@pytest.fixture()
def ckpt(saved, tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(saved, folder)
    return folder


def _edit_tensors(folder: Path, edit) -> None:
    from safetensors import safe_open

    path = folder / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path), metadata=metadata)


def _edit_config(folder: Path, edit) -> None:
    path = folder / "config.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def _refused(folder: Path, message: str) -> CheckpointError:
    with pytest.raises(CheckpointError, match=message) as info:
        TSHSRModel.from_pretrained(folder)
    return info.value


def test_untouched_copy_loads(ckpt) -> None:
    TSHSRModel.from_pretrained(ckpt)  # the fixtures themselves are sound


def test_truncated_weights_refused(ckpt) -> None:
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _refused(ckpt, "not a valid safetensors file")
    path.write_bytes(data[:5])
    _refused(ckpt, "not a valid safetensors file")
    path.write_bytes(b"")
    _refused(ckpt, "not a valid safetensors file")


def test_corrupted_header_refused(ckpt) -> None:
    path = ckpt / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32  # garbage in the JSON header
    path.write_bytes(bytes(data))
    _refused(ckpt, "not a valid safetensors file")
    data = bytearray(path.read_bytes())
    data[0:8] = (2**40).to_bytes(8, "little")  # header length beyond the file
    path.write_bytes(bytes(data))
    _refused(ckpt, "not a valid safetensors file")


def test_corrupted_tensor_bytes_refused(ckpt) -> None:
    """Flipped bytes inside the tensor data (header intact) must not load as a working model."""
    path = ckpt / "model.safetensors"
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    middle = header + (len(data) - header) // 2
    data[middle:middle + 16] = bytes(b ^ 0x5A for b in data[middle:middle + 16])
    path.write_bytes(bytes(data))
    _refused(ckpt, "(?i)corrupt|changed|checksum|does not match")


def test_missing_tensor_refused(ckpt) -> None:
    _edit_tensors(ckpt, lambda s: s.pop("streams.i2t.local_readout.gate.weight"))
    error = _refused(ckpt, "missing tensors")
    assert "streams.i2t.local_readout.gate.weight" in str(error)


def test_extra_tensor_refused(ckpt) -> None:
    _edit_tensors(ckpt, lambda s: s.__setitem__("streams.t2i.secret.weight", torch.zeros(3)))
    error = _refused(ckpt, "unexpected tensors")
    assert "streams.t2i.secret.weight" in str(error)


def test_wrong_tensor_shape_refused(ckpt) -> None:
    _edit_tensors(ckpt, lambda s: s.__setitem__("text_proj.weight", torch.zeros(5, 5)))
    _refused(ckpt, r"wrong shapes .*text_proj.weight: checkpoint \(5, 5\) vs model \(32, 32\)")


def test_config_edited_to_other_shapes_refused(ckpt) -> None:
    _edit_config(ckpt, lambda d: d.__setitem__("embed_dim", 48))
    error = _refused(ckpt, "(?i)does not match|changed")
    assert "config.json" in str(error)


def _strip_checksums(folder: Path) -> None:
    """Rewrite the weights as an older tshsr did: no checksums in the metadata."""
    path = folder / "model.safetensors"
    save_file(load_file(str(path)), str(path), metadata={"format": "pt"})


def test_checkpoint_without_checksums_still_loads_and_checks_shapes(ckpt, saved, regions, captions) -> None:
    _strip_checksums(ckpt)
    reference = TSHSRModel.from_pretrained(saved).score(regions, captions).scores
    assert torch.equal(TSHSRModel.from_pretrained(ckpt).score(regions, captions).scores, reference)
    _edit_config(ckpt, lambda d: d.__setitem__("embed_dim", 48))
    error = _refused(ckpt, r"wrong shapes .*image_proj.weight: checkpoint \(32, 16\) vs model \(48, 16\)")
    assert "does not match the model built from its config.json" in str(error)


def test_config_edited_without_changing_shapes_refused(ckpt) -> None:
    """reasoning_steps changes no tensor, but the weights were trained for 2 steps: refuse an
    edited config.json (from_pretrained(..., reasoning_steps=3) is the explicit way)."""
    _edit_config(ckpt, lambda d: d.__setitem__("reasoning_steps", 3))
    _refused(ckpt, "config.json")


def test_missing_config_refused(ckpt) -> None:
    (ckpt / "config.json").unlink()
    _refused(ckpt, "config.json is missing")


def test_invalid_config_refused(ckpt) -> None:
    (ckpt / "config.json").write_text("{not json")
    _refused(ckpt, "config.json is invalid.*not valid JSON")


def test_unknown_config_field_refused(ckpt) -> None:
    _edit_config(ckpt, lambda d: d.__setitem__("hidden_trick", 1))
    _refused(ckpt, r"unknown fields \['hidden_trick'\]")


def test_bad_config_value_refused(ckpt) -> None:
    _edit_config(ckpt, lambda d: d.__setitem__("head", "mystery"))
    _refused(ckpt, "config.json is invalid.*head='mystery'")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_refused(ckpt, value) -> None:
    def poison(state):
        state["image_proj.weight"][3, 2] = value

    _edit_tensors(ckpt, poison)
    _refused(ckpt, "non-finite values in image_proj.weight")


def test_missing_weights_refused(ckpt) -> None:
    (ckpt / "model.safetensors").unlink()
    _refused(ckpt, "Weights file not found")


def test_missing_or_mismatched_vocabulary_refused(ckpt) -> None:
    vocab_path = ckpt / "vocab.json"
    words = json.loads(vocab_path.read_text())
    vocab_path.write_text(json.dumps(words + ["zebra"]))
    _refused(ckpt, "vocab.json")
    # Same size, two words swapped: every id still fits, but would read another word's embedding.
    swapped = list(words)
    swapped[5], swapped[6] = swapped[6], swapped[5]
    vocab_path.write_text(json.dumps(swapped))
    _refused(ckpt, "vocab.json does not match")
    _strip_checksums(ckpt)
    vocab_path.write_text(json.dumps(words + ["zebra"]))
    _refused(ckpt, f"vocab.json has {len(words) + 1} words, config.json says vocab_size={len(words)}")
    vocab_path.unlink()
    _refused(ckpt, "vocab.json")


def test_missing_folder_is_a_clear_error(tmp_path) -> None:
    with pytest.raises((FileNotFoundError, CheckpointError), match="not found|not a local folder"):
        TSHSRModel.from_pretrained(tmp_path / "no" / "such" / "model")
