"""The TSHSR model: encoders, two similarity streams, three levels, hierarchical reasoning.

The image and text sides are encoded separately (:meth:`TSHSRModel.encode_images`,
:meth:`TSHSRModel.encode_texts`), so a gallery is encoded once and scored many times
(:meth:`TSHSRModel.score_encoded`, by the engine in :mod:`tshsr.scoring`). Every score comes with
its exact breakdown per stream and level (``TSHSROutput.contributions``). :meth:`TSHSRModel.forward`
is the training entry: backbone features in, the loss and its parts out (:mod:`tshsr.loss`).
Saving, loading and the model card live in :mod:`tshsr.hub`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn
from tqdm.auto import tqdm

from .config import TSHSRConfig
from .encoders import build_backbones, trained_backbone_prefixes
from .encoding import Encoding, ImageEncoding, SideTowers, TextEncoding, encode_features
from .hub import WEIGHTS_NAME, CheckpointError, check_backbones, load_model, model_card, save_model
from .loss import LossSettings, MatchingLoss, matching_loss
from .processing import InvalidInputError, TSHSRProcessor, Vocabulary
from .registry import get_head
from .scoring import ScoringEngine, TSHSROutput, TSHSRPairOutput

__all__ = ["TSHSRModel", "TSHSROutput", "TSHSRPairOutput", "Encoding", "ImageEncoding", "TextEncoding",
           "CheckpointError", "WEIGHTS_NAME"]


class TSHSRModel(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="tshsr",
    tags=["image-text-matching", "cross-modal-retrieval", "tshsr"],
    pipeline_tag="zero-shot-image-classification",
    license="mit",
):
    """Two-stream Hierarchical Similarity Reasoning for image-text matching."""

    def __init__(self, config: TSHSRConfig | dict | None = None, vocabulary: Vocabulary | None = None,
                 pretrained_backbones: bool = True):
        super().__init__()
        if config is None:
            config = TSHSRConfig()
        elif isinstance(config, dict):
            config = TSHSRConfig.from_dict(config)
        config = replace(config)  # our own copy: filled-in fields must not leak into the caller's
        self.vocabulary = vocabulary

        self.image_backbone, self.text_backbone = build_backbones(config, vocabulary, pretrained_backbones)
        self.config = config
        self._hub_mixin_config = None  # config.json is written by _save_pretrained, our format

        for prefix in self.frozen_prefixes():  # no grads, and eval mode for good (see train)
            getattr(self, prefix.rstrip(".")).requires_grad_(False).eval()
        if config.text_finetune_layers:  # the top of the frozen text encoder trains (dropout stays off)
            self.text_backbone.top_layers().requires_grad_(True)

        # ---- per-side trainable layers ----
        D = config.embed_dim
        Fi, Ft = config.image_feature_dim, config.text_feature_dim
        SideTowers.build(self, Fi, Ft, D)  # image_proj, text_proj, image_pool, ...: the i2t stream's
        self.logit_scale = nn.Parameter(torch.tensor(math.log(config.logit_scale_init)))
        self.head_kind = get_head(config.head)
        self.has_context = self.head_kind.has_context(config)
        self._detach_context_units = False  # training only: see HeadKind.set_context_detach
        if config.separate_streams:  # the t2i stream's own towers (the attributes above are i2t's)
            self.t2i_towers = SideTowers(Fi, Ft, D)
        if self.has_context and config.context_pooling == "learned":
            self.image_context_queries = nn.Parameter(torch.randn(config.context_units_image, D) / math.sqrt(D))
            self.text_context_queries = nn.Parameter(torch.randn(config.context_units_text, D) / math.sqrt(D))

        self.head_kind.build(self, config)  # the similarity head's modules, under their checkpoint names
        if config.image_context_stage is not None:  # the context level's own image units (an earlier stage);
            # built last, so that every other layer starts from the same weights as without it (same seed)
            self.image_context_proj = nn.Linear(config.image_context_dim, D)
        if config.text_context_layer is not None:  # the same for captions: a lower layer of the text encoder
            self.text_context_proj = nn.Linear(Ft, D)
        self.engine = ScoringEngine(self)
        self.card_results = None  # model-index results of the card this model was loaded with
        if pretrained_backbones:
            check_backbones(self)

    # ------------------------------------------------------------------------------------------
    # Frozen backbones stay in eval mode (BatchNorm statistics must not drift) and keep no grads.
    def frozen_prefixes(self) -> list[str]:
        """State-dict prefixes of the frozen pretrained backbones (not stored in checkpoints)."""
        prefixes = []
        if self.config.image_encoder == "timm" and not self.config.finetune_image:
            prefixes.append("image_backbone.")
        if self.config.text_encoder == "transformers" and not self.config.finetune_text:
            prefixes.append("text_backbone.")
        return prefixes

    def train(self, mode: bool = True):
        super().train(mode)
        for prefix in self.frozen_prefixes():
            getattr(self, prefix.rstrip(".")).eval()
        return self

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    @property
    def processor(self) -> TSHSRProcessor:
        if getattr(self, "_processor", None) is None:
            self._processor = TSHSRProcessor(self.config, self.vocabulary)
        return self._processor

    @property
    def contribution_keys(self) -> list[str]:
        return self.config.contribution_keys

    # Backbone features (frozen: cacheable) -------------------------------------------------------
    def image_features(self, images) -> tuple[torch.Tensor, torch.Tensor]:
        """Region features [N, K, F] and mask [N, K] from PIL images/paths, or precomputed arrays."""
        if self.config.image_encoder == "timm":
            pixels = self.processor.preprocess_images(images).to(self.device)
            return self.image_backbone(pixels)
        if isinstance(images, (list, tuple)):
            images = np.stack([np.asarray(x, dtype=np.float32) for x in images])
        # copied only when needed: float32, and a read-only memory map (a cached split) is never aliased
        regions = images if torch.is_tensor(images) else torch.from_numpy(np.require(images, np.float32, "W"))
        return self.image_backbone(regions.to(self.device))

    def text_features(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token features [N, L, F] and word mask [N, L] (special tokens and padding excluded)."""
        tok = {k: v.to(self.device) for k, v in self.processor.tokenize(texts).items()}
        return self.text_backbone(tok["input_ids"], tok["attention_mask"], tok["word_mask"])

    # Trainable per-side encoding (tshsr.encoding.encode_features) -----------------------------
    def encode_image_features(self, regions: torch.Tensor, mask: torch.Tensor) -> ImageEncoding:
        return encode_features(self, "image", regions, mask)

    def encode_text_features(self, tokens: torch.Tensor, mask: torch.Tensor) -> TextEncoding:
        return encode_features(self, "text", tokens, mask)

    # Public encoding ---------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images, batch_size: int = 32, progress: bool = False) -> ImageEncoding:
        """Encode images (PIL images or paths; region arrays for precomputed models) once."""
        n = len(images)
        if n == 0:
            raise InvalidInputError("No images given: pass at least one image")
        parts = []
        for start in tqdm(range(0, n, batch_size), desc="encode images", disable=not progress, unit="batch"):
            regions, mask = self.image_features(images[start:start + batch_size])
            parts.append(self.encode_image_features(regions, mask))
        return ImageEncoding.cat(parts, consume=True)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 128, progress: bool = False) -> TextEncoding:
        if isinstance(texts, str):
            raise InvalidInputError("encode_texts takes a list of strings, not one string")
        if len(texts) == 0:
            raise InvalidInputError("No texts given: pass at least one caption")
        parts = []
        for start in tqdm(range(0, len(texts), batch_size), desc="encode texts", disable=not progress, unit="batch"):
            tokens, mask = self.text_features(texts[start:start + batch_size])
            parts.append(self.encode_text_features(tokens, mask))
        return TextEncoding.cat(parts, consume=True)

    # Training entry ------------------------------------------------------------------------------
    def forward(self, image_features: torch.Tensor, image_mask: torch.Tensor, text_features: torch.Tensor,
                text_mask: torch.Tensor, positive: torch.Tensor, settings: LossSettings | None = None,
                hardest: bool = False, generator: torch.Generator | None = None) -> MatchingLoss:
        """The training loss of a batch: backbone features of the images [N, K, F] and captions
        [M, L, F] with their masks, ``positive`` [N, M] marking matching pairs. Returns the loss
        and its parts (contrastive, hinge, auxiliary hinges, number of scored pairs)."""
        images = self.encode_image_features(image_features, image_mask)
        texts = self.encode_text_features(text_features, text_mask)
        return matching_loss(self, images, texts, positive, settings or LossSettings(), hardest, generator)

    # Scoring: one output type, [n_images, n_texts]; explicit pairs have their own ----------------
    def global_similarity(self, images: Encoding, texts: Encoding) -> torch.Tensor:
        """Cosine of the contrastive global vectors, [n_images, n_texts]: the cheap shortlist."""
        return images.embedding @ texts.embedding.T

    def score_pairs(self, images: Encoding, texts: Encoding, image_index, text_index,
                    return_attention: bool = False) -> TSHSRPairOutput:
        """Scores of P explicit pairs (image_index[p], text_index[p]): every tensor of the output
        has a leading pair axis [P] (reranking shortlists, mined pairs in training)."""
        return self.engine.pairs(images, texts, image_index, text_index, return_attention)

    @torch.no_grad()
    def score_encoded(self, images: Encoding, texts: Encoding, block_pairs: int | None = None,
                      progress: bool = False, return_attention: bool = False,
                      compile: bool = False, precision: str = "auto") -> TSHSROutput:
        """All pairs, [n_images, n_texts], in blocks of about ``block_pairs`` pairs (bounded memory;
        default: sized by the engine for the device).

        ``precision``: ``"auto"`` runs the blocks under bf16 autocast on a GPU that supports it
        (matrix products in bf16, softmax and reductions in fp32) and in fp32 elsewhere; ``"fp32"``
        or ``"bf16"`` force one. Results are always returned in fp32.

        ``compile=True`` runs each block through ``torch.compile`` (inductor), which fuses the
        element-wise chains between the matrix products (faster after a one-off compilation that
        torch caches on disk; on CPU it needs a C++ compiler; docs/RESULTS.md has the figures).
        Every block then has the same shape (the last ones are padded and the padding dropped),
        so one compilation serves the whole run. Attention maps are not available on this path.
        """
        return self.engine.exhaustive(images, texts, block_pairs, progress, return_attention, compile, precision)

    @torch.no_grad()
    def mixing_weights(self) -> dict[str, float]:
        """The fixed weight of each ``"<stream>/<level>"`` contribution (level x stream weight)."""
        return {k: float(v) for k, v in self.head_kind.mixing_weights(self).items()}

    @torch.no_grad()
    def score(self, images, texts: Sequence[str], return_attention: bool = False,
              batch_size: int = 32) -> TSHSROutput:
        """Score every image against every text: ``.scores`` is [len(images), len(texts)].

        images: PIL images or file paths (region arrays for a precomputed-features model);
        texts: strings. With ``return_attention`` the output also carries the attention maps of
        every pair, the words of each text and the image region grid (keep inputs small then).
        """
        if isinstance(texts, str):
            raise InvalidInputError("texts must be a list of strings, not one string")
        if images is None or len(images) == 0:
            raise InvalidInputError("No images given: pass at least one image")
        if len(texts) == 0:
            raise InvalidInputError("No texts given: pass at least one caption")
        was_training = self.training
        self.eval()
        try:
            image_enc = self.encode_images(images, batch_size=batch_size)
            text_enc = self.encode_texts(texts)
            out = self.score_encoded(image_enc, text_enc, return_attention=return_attention)
        finally:
            self.train(was_training)
        if return_attention:
            out.text_tokens = [self.processor.tokens(t) for t in texts]
            out.image_grid = self.image_grid()
        return out

    def image_grid(self) -> tuple[int, int] | None:
        """(rows, cols) of the image regions for a timm grid backbone, None for free regions."""
        if self.config.image_encoder != "timm":
            return None
        if getattr(self, "_grid", None) is None:
            self._grid = self.image_backbone.grid_shape(self.config.image_size)
        return self._grid

    # Saving and loading (strict, safetensors only): see tshsr.hub --------------------------------
    def saved_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint stores: everything but frozen pretrained backbones."""
        frozen, trained = tuple(self.frozen_prefixes()), tuple(trained_backbone_prefixes(self))
        return {k: v.detach().contiguous() for k, v in self.state_dict().items()
                if not k.startswith(frozen) or k.startswith(trained)}

    def _save_pretrained(self, save_directory: Path) -> None:
        save_model(self, save_directory)

    def generate_model_card(self, *args, **kwargs):
        """The card save_pretrained and push_to_hub write; keywords go to :func:`tshsr.hub.model_card`."""
        kwargs.setdefault("results", self.card_results)
        return model_card(self.config, **kwargs)

    def push_to_hub(self, repo_id: str, *, model_card_kwargs: dict | None = None, **kwargs):
        """Upload to the Hub with this model's card (its loading line names ``repo_id``)."""
        card = {"repo_id": repo_id, **(model_card_kwargs or {})}
        return super().push_to_hub(repo_id, model_card_kwargs=card, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *, revision: str | None = None,
                        cache_dir: str | None = None, token: str | None = None, local_files_only: bool = False,
                        map_location: str | torch.device = "cpu", force_download: bool = False,
                        **config_overrides) -> "TSHSRModel":
        """Load a model from a local folder or a Hugging Face Hub repository id, strictly: a missing,
        unexpected or misshapen tensor, a file changed after saving or a frozen backbone whose weights
        differ from training raises :class:`CheckpointError`; never a model with random weights."""
        return load_model(cls, pretrained_model_name_or_path, map_location=map_location,
                          config_overrides=config_overrides, revision=revision, cache_dir=cache_dir, token=token,
                          local_files_only=local_files_only, force_download=force_download)
