"""Saving, loading and verifying checkpoints, and the model card.

A checkpoint folder holds ``config.json``, ``model.safetensors`` (trainable weights only; frozen
pretrained backbones are referenced by name), ``vocab.json`` for a BiGRU text encoder and
``README.md``. Loading is strict and verified: checksums of the three files are saved in the
safetensors metadata, and the sha256 of frozen backbone weights in ``config.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path

import torch

from .config import TSHSRConfig
from .io import atomic_write
from .processing import Vocabulary

WEIGHTS_NAME = "model.safetensors"
PAPER_URL = "https://arxiv.org/abs/2203.05349"
INSTALL_LINE = "pip install -e .  # in a clone of the tshsr repository (adds the tshsr package)"
TAGS = ["image-text-matching", "cross-modal-retrieval", "tshsr"]


class CheckpointError(RuntimeError):
    """A checkpoint that does not match its model: missing, corrupt, tampered or mismatched."""


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict: names, shapes, dtypes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The metadata of a safetensors file ({} when the file is absent: the loader reports that)."""
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        return {}
    try:
        with safe_open(str(path), "pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is not a valid safetensors file (corrupt or truncated?): {exc}") from exc


# ----------------------------------------------------------------------------------------------
# Frozen backbones: referenced by name, pinned by the sha256 of their weights
# ----------------------------------------------------------------------------------------------
def backbone_digests(model) -> dict[str, str]:
    """sha256 of each frozen pretrained backbone's weights: {"image_backbone": ..., "text_backbone": ...}."""
    return {prefix.rstrip("."): state_digest(getattr(model, prefix.rstrip(".")).state_dict())
            for prefix in model.frozen_prefixes()}


def check_backbones(model) -> None:
    """Fill ``config.backbone_sha256`` on a new model, or check the backbones against it.

    A frozen backbone is not stored in the checkpoint: it is rebuilt from a weight package or the
    Hub. If those weights changed since training, the model would silently score differently.
    """
    current = backbone_digests(model)
    saved = model.config.backbone_sha256
    if saved is None:
        model.config.backbone_sha256 = current or None
        return
    changed = [name for name in saved if name in current and current[name] != saved[name]]
    if changed:
        names = {"image_backbone": f"image backbone {model.config.image_backbone!r}",
                 "text_backbone": f"text model {model.config.text_model!r}"}
        raise CheckpointError(
            "The pretrained weights of the " + " and ".join(names.get(n, n) for n in changed) + " differ from "
            "those the checkpoint was trained with (sha256 recorded in config.json: backbone_sha256). "
            "Install the weight package version the model was trained with (see requirements.txt).")


# ----------------------------------------------------------------------------------------------
# Saving and loading
# ----------------------------------------------------------------------------------------------
def save_model(model, directory: str | Path) -> None:
    """Write config.json, model.safetensors (with checksums) and vocab.json, each atomically."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.cpu() for k, v in model.saved_state_dict().items()}
    # Checksums of the three files, checked on load: an edited config.json or vocab.json, or
    # flipped bytes in the tensor data, are refused instead of silently giving another model.
    metadata = {"format": "pt", "tshsr_config_sha256": model.config.fingerprint(),
                "tshsr_weights_sha256": state_digest(state)}
    vocab_json = model.vocabulary.to_json() if model.vocabulary is not None else None
    if vocab_json is not None:
        metadata["tshsr_vocab_sha256"] = hashlib.sha256(vocab_json.encode()).hexdigest()
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata=metadata))
    atomic_write(directory / "config.json",
                 lambda p: Path(p).write_text(json.dumps(model.config.to_dict(), indent=2, sort_keys=True) + "\n"))
    if vocab_json is not None:
        atomic_write(directory / "vocab.json", lambda p: Path(p).write_text(vocab_json))


def resolve_directory(name_or_path: str | os.PathLike, **hub_kwargs) -> Path:
    """A local checkpoint folder, or the snapshot of a Hub repository id."""
    directory = Path(name_or_path)
    if directory.is_dir():
        return directory
    name = str(name_or_path)
    if name.startswith((".", "/")) or os.sep in name.strip("/").split("/", 1)[-1] or name.count("/") > 1:
        raise FileNotFoundError(f"Model folder not found: {name}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=name, allow_patterns=["config.json", WEIGHTS_NAME, "vocab.json",
                                                                      "README.md"], **hub_kwargs))
    except Exception as exc:
        raise CheckpointError(f"Could not load {name!r}: it is not a local folder and the Hugging Face Hub "
                              f"could not provide it ({type(exc).__name__}: {exc})") from exc


def read_config(directory: Path, metadata: dict[str, str]) -> TSHSRConfig:
    """config.json, checked against the fingerprint saved with the weights."""
    try:
        config = TSHSRConfig.load(directory)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{directory} is not a TSHSR checkpoint: config.json is missing") from exc
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{directory}/config.json is invalid: {exc}") from exc
    # The fingerprint of config.json as written (not of the parsed config, so that fields added to
    # TSHSRConfig later, with defaults, or legacy fields dropped on load, keep older checkpoints valid).
    raw = json.loads((directory / "config.json").read_text())
    written = hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:16]
    if metadata.get("tshsr_config_sha256", written) != written:
        raise CheckpointError(
            f"{directory}/config.json does not match the weights in {WEIGHTS_NAME}: it was changed "
            f"after they were saved (fingerprint {written}, saved with {metadata['tshsr_config_sha256']}). "
            f"Restore the original config.json; to change a setting on load, pass it to "
            f"from_pretrained(..., name=value).")
    return config


def read_vocabulary(directory: Path, config: TSHSRConfig, metadata: dict[str, str]) -> Vocabulary:
    try:
        vocabulary = Vocabulary.load(directory)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{directory} is incomplete: {exc}") from exc
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{directory}/vocab.json is invalid: {exc}") from exc
    saved = metadata.get("tshsr_vocab_sha256")
    if saved is not None and saved != hashlib.sha256(vocabulary.to_json().encode()).hexdigest():
        raise CheckpointError(f"{directory}/vocab.json does not match the weights in {WEIGHTS_NAME}: it was "
                              f"changed after they were saved (word ids would point at other words' embeddings)")
    if len(vocabulary) != config.vocab_size:
        raise CheckpointError(f"{directory}/vocab.json has {len(vocabulary)} words, config.json says "
                              f"vocab_size={config.vocab_size}")
    return vocabulary


def load_model(cls, name_or_path, map_location="cpu", config_overrides: dict | None = None, **hub_kwargs):
    """Build ``cls`` from a checkpoint folder or Hub id, verified (see :meth:`TSHSRModel.from_pretrained`)."""
    directory = resolve_directory(name_or_path, **hub_kwargs)
    metadata = safetensors_metadata(directory / WEIGHTS_NAME)
    config = read_config(directory, metadata)
    if config_overrides:
        config = replace(config, **config_overrides)
    vocabulary = read_vocabulary(directory, config, metadata) if config.text_encoder == "bigru" else None
    model = cls(config, vocabulary=vocabulary)
    load_weights(model, directory / WEIGHTS_NAME)
    model.card_results = read_card_results(directory)
    model.to(map_location)
    model.eval()
    return model


def load_weights(model, path: str | Path) -> None:
    """Load trainable weights strictly: every stored tensor present, finite and as checksummed."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Weights file not found: {path}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is not a valid safetensors file (corrupt or truncated?): {exc}") from exc
    expected = model.saved_state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        lines = [f"Checkpoint {path} does not match the model built from its config.json:"]
        if missing:
            lines.append(f"  missing tensors ({len(missing)}): {', '.join(missing[:10])}")
        if unexpected:
            lines.append(f"  unexpected tensors ({len(unexpected)}): {', '.join(unexpected[:10])}")
        if shapes:
            lines.append(f"  wrong shapes ({len(shapes)}): {'; '.join(shapes[:10])}")
        raise CheckpointError("\n".join(lines))
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"Checkpoint {path} has non-finite values in {', '.join(bad[:10])}")
    saved_digest = safetensors_metadata(path).get("tshsr_weights_sha256")
    if saved_digest is not None and saved_digest != state_digest(state):
        raise CheckpointError(f"{path} is corrupt: its tensor data does not match the checksum saved with "
                              f"it (changed or damaged after saving)")
    model.load_state_dict(state, strict=False)  # frozen backbone keys are absent by design;
    # every other key was checked above, so nothing stays at its random initialisation.


# ----------------------------------------------------------------------------------------------
# The model card
# ----------------------------------------------------------------------------------------------
CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

Two-stream Hierarchical Similarity Reasoning for image-text matching ([paper]({{ paper_url }})),
with the `tshsr` library. Install and load:

```bash
{{ install_line }}
```

```python
from tshsr import TSHSRModel
model = TSHSRModel.from_pretrained("{{ repo_id }}")
out = model.score(["photo.jpg"], ["a dog runs on the beach"])  # out.scores: [images, captions]
```

## Model

{{ model_lines }}
{{ training_section }}{{ results_section }}"""


def read_card_results(directory: Path) -> list | None:
    """The evaluation results of a checkpoint's README.md (kept so ``push_to_hub`` republishes them)."""
    path = Path(directory) / "README.md"
    if not path.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(path).data.eval_results
    except Exception:  # a hand-written README without model-index metadata
        return None


def eval_results(metrics: dict, dataset: str, dataset_name: str, split: str | None) -> list:
    """model-index entries (recall at 1/5/10 both ways and RSUM) for ``metrics``."""
    from huggingface_hub import EvalResult

    values = [(f"{d}_recall@{k}", f"{d.replace('i2t', 'Image-to-text').replace('t2i', 'Text-to-image')} R@{k}",
               metrics[d][f"r{k}"]) for d in ("i2t", "t2i") for k in (1, 5, 10)]
    values.append(("rsum", "RSUM", metrics["rsum"]))
    return [EvalResult(task_type="image-text-retrieval", task_name="Image-text retrieval", dataset_type=dataset,
                       dataset_name=dataset_name, dataset_split=split, metric_type=kind, metric_name=name,
                       metric_value=round(float(value), 2))
            for kind, name, value in values]


def _architecture_lines(config: TSHSRConfig) -> list[str]:
    def tuning(finetuned: bool) -> str:
        return "fine-tuned" if finetuned else "frozen"

    image = (f"`{config.image_backbone}` ({tuning(config.finetune_image)})" if config.image_encoder == "timm"
             else f"precomputed region features ({config.image_feature_dim}-d)")
    text_tuning = (f"top {config.text_finetune_layers} layer{'s' * (config.text_finetune_layers > 1)} fine-tuned "
                   f"and stored here, the rest frozen" if config.text_finetune_layers else tuning(config.finetune_text))
    text = (f"`{config.text_model}` ({text_tuning})" if config.text_encoder == "transformers"
            else "a BiGRU over its own vocabulary (trained, stored here)")
    lines = [f"- head `{config.head}`, streams {', '.join(config.streams)}, levels {', '.join(config.levels)}; "
             f"D = {config.embed_dim}, m = {config.sim_dim}",
             f"- image side: {image}; text side: {text}"]
    if config.separate_streams:
        lines.append("- separate streams: each stream has its own projections, pooling and contrastive embedding; "
                     "the shortlist cosine is the mean of the two")
    if "context" in config.levels and config.context_pooling == "windows":
        lines.append(f"- context units are fixed windows: {config.context_units_text} phrase windows along each "
                     f"caption, {config.context_units_image} neighbourhoods on the image grid")
    if config.text_context_layer is not None:
        states = ("token embeddings (layer 0)" if config.text_context_layer == 0
                  else f"frozen layer-{config.text_context_layer} states")
        lines.append(f"- the caption context units pool the text encoder's {states} through a projection of their "
                     "own, not the word units of the local level")
    if config.image_context_stage is not None:
        lines.append(f"- the image context units pool the backbone's stage-{config.image_context_stage} features "
                     "through a projection of their own, not the region units of the local level")
    if config.level_fusion == "fixed" and config.level_weights is not None:
        sets = {f"the {s} stream": config.stream_level_weights(s) for s in config.streams}
        if len(set(sets.values())) == 1:
            sets = {"each stream": next(iter(sets.values()))}
        for where, weights in sets.items():
            shares = ", ".join(f"{lv} {w / sum(weights):.2f}" for lv, w in zip(config.levels, weights))
            # a lower level without a score weight still reaches the score through the global node
            silent = [lv for lv, w in zip(config.levels, weights) if w == 0 and lv != "global"]
            feed = "levels feed" if len(silent) > 1 else "level feeds"
            lines.append(f"- fixed level weights in {where}'s score: {shares}"
                         + (f" (the {' and '.join(silent)} {feed} the global level through the reasoning only)"
                            if silent else ""))
    if config.backbone_sha256:
        lines.append("- frozen pretrained backbones are not stored here; they are resolved by name when loading "
                     "(offline PyPI packages first) and checked against the sha256 in config.json.")
    return lines


def model_card(config: TSHSRConfig, repo_id: str | None = None, metrics: dict | None = None,
               dataset: str | None = None, split: str | None = None, training: list[str] | None = None,
               history: list[dict] | None = None, results: list | None = None, dataset_name: str | None = None):
    """The model card of a model: metadata (model-index metrics, datasets, paper, tags), how to
    install and load it, the architecture, and, when given, training and validation.

    ``metrics`` is an evaluation result ({"i2t": {"r1", ...}, "t2i": ..., "rsum", ...}) on
    ``dataset`` (an id such as ``flickr30k``; ``dataset_name`` is how a reader knows it) and
    ``split``; ``results`` are ready model-index entries (from a loaded card).
    """
    from huggingface_hub import ModelCard, ModelCardData

    from .data import COCO_HUB_ID, FLICKR30K_HUB_ID

    hub_datasets = {"flickr30k": FLICKR30K_HUB_ID, "coco": COCO_HUB_ID}  # local folders have no Hub id
    dataset_name = dataset_name or dataset
    if metrics and dataset:
        results = eval_results(metrics, dataset, dataset_name, split)
    name = config.preset_name or config.head
    title = f"TSHSR ({name})" + (f" trained on {dataset_name}" if dataset_name else "")
    data = ModelCardData(library_name="tshsr", license="mit", tags=list(TAGS),
                         pipeline_tag="zero-shot-image-classification",
                         datasets=[hub_datasets[dataset]] if dataset in hub_datasets else None,
                         model_name=title if results else None, eval_results=results or None)
    model_lines = "\n".join(_architecture_lines(config))
    training_section = ("\n## Training\n\n" + "\n".join(f"- {line}" for line in training) + "\n") if training else ""
    results_section = ""
    if metrics:
        results_section += (
            f"\n## Validation ({dataset_name} `{split}`, {metrics.get('n_images')} images, "
            f"{metrics.get('n_captions')} captions, {metrics.get('protocol', '')})\n\n"
            "| i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | RSUM |\n|---|---|---|---|---|---|---|\n"
            + "| " + " | ".join(f"{v:.1f}" for v in (*(metrics["i2t"][f"r{k}"] for k in (1, 5, 10)),
                                                      *(metrics["t2i"][f"r{k}"] for k in (1, 5, 10)),
                                                      metrics["rsum"])) + " |\n")
    if history:
        best = max(history, key=lambda h: h["rsum"])["epoch"]
        results_section += "\nValidation RSUM by epoch: " + ", ".join(
            f"{h['epoch']}: {h['rsum']:.1f}" + (" (best, kept)" if h["epoch"] == best else "") for h in history) + "\n"
    return ModelCard.from_template(data, template_str=CARD_TEMPLATE, title=title, paper_url=PAPER_URL,
                                   install_line=INSTALL_LINE, repo_id=repo_id or "path/to/checkpoint",
                                   model_lines=model_lines, training_section=training_section,
                                   results_section=results_section)
