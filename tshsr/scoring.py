"""The scoring engine: encoded images x encoded captions -> scores and their breakdown.

:class:`ScoringEngine` owns how pairs are scored: the head pass on a list of pairs, the
exhaustive grid in blocks of a bounded size (block shape, ``torch.compile`` with its error
message, bf16 autocast) and the assembly of the blocks into one output. The model's public
methods (``score_encoded``, ``score_pairs``) delegate to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .encoding import Encoding, head_inputs
from .processing import InvalidInputError


@dataclass
class _ScoreBreakdown:
    scores: torch.Tensor
    contributions: dict[str, torch.Tensor]
    level_scores: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    stream_scores: dict[str, torch.Tensor] = field(default_factory=dict)
    global_similarity: torch.Tensor | None = None
    attentions: dict[str, dict[str, torch.Tensor]] | None = None


@dataclass
class TSHSROutput(_ScoreBreakdown):
    """Scores of every image against every text, and their exact breakdown.

    scores: [n_images, n_texts]. contributions: {"<stream>/<level>": [n_images, n_texts]} summing
    to ``scores``; each is ``weights[key] * level_scores[key]``. stream_scores: each stream's own
    score (a matcher on its own). global_similarity: cosine of the contrastive global vectors.
    attentions (on request): per stream, ``attention`` (query units over key units: for "t2i"
    words over regions [.., L, K], for "i2t" regions over words [.., K, L]) and
    ``local_weights`` (how much each query unit counts in the local readout) and, for models
    with alignment levels, ``unit_alignment`` (each query unit's cosine with what it attended to:
    the local level's alignment score is their mean), with leading axes [n_images, n_texts].
    ``TSHSRModel.score`` adds the words of each text and the region grid.
    """

    text_tokens: list[list[str]] | None = None
    image_grid: tuple[int, int] | None = None


@dataclass
class TSHSRPairOutput(_ScoreBreakdown):
    """The same breakdown for an explicit list of P (image, text) pairs: every tensor has a
    leading pair axis [P] instead of [n_images, n_texts] (see ``TSHSRModel.score_pairs``)."""


def autocast_context(device: torch.device, precision: str):
    """The autocast context exhaustive scoring runs under for ``precision``, or None for fp32."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    if precision == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        precision = "bf16" if bf16 else "fp32"
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else None


class ScoringEngine:
    """Scores encodings with a model's head; one engine per model (``model.engine``)."""

    def __init__(self, model):
        self.model = model
        self._compiled_block = None

    # ---- one pass of the head -----------------------------------------------------------------
    def run_heads(self, img: dict, txt: dict, cosine: torch.Tensor, want_maps: bool,
                  grid: tuple[int, int] | None, output=TSHSRPairOutput) -> TSHSROutput:
        """Pairs (``grid=None``: leading pair axis) or every image x every text of a block
        (``grid=(n_images, n_texts)``, image-major), flattened to one pair axis."""
        model = self.model
        contributions, level_scores, stream_scores, maps = model.head_kind.run(
            model, img, txt, cosine, want_maps, grid)
        scores = torch.stack(list(contributions.values()), 0).sum(0)
        # The weights as plain floats; a compiled block (which returns tensors only) leaves them out.
        weights = {} if torch.compiler.is_compiling() else model.mixing_weights()
        return output(scores=scores, contributions=contributions, level_scores=level_scores, weights=weights,
                      stream_scores=stream_scores, global_similarity=cosine,
                      attentions=maps if want_maps else None)

    def pairs(self, images: Encoding, texts: Encoding, image_index, text_index,
              return_attention: bool = False) -> TSHSRPairOutput:
        image_index = torch.as_tensor(image_index, dtype=torch.long, device=images.device)
        text_index = torch.as_tensor(text_index, dtype=torch.long, device=texts.device)
        if image_index.shape != text_index.shape or image_index.dim() != 1:
            raise ValueError("image_index and text_index must be 1-D and of equal length")
        img = head_inputs(images, image_index)
        txt = head_inputs(texts, text_index)
        cosine = (img["embedding"] * txt["embedding"]).sum(-1)
        return self.run_heads(img, txt, cosine, return_attention, grid=None)

    def _grid(self, images: Encoding, texts: Encoding, return_attention: bool) -> TSHSROutput:
        """Every image against every text in one pass, flattened image-major; the same values as
        :meth:`pairs` on the same pairs, computed with large matrix products."""
        cosine = (images.embedding @ texts.embedding.T).reshape(-1)
        return self.run_heads(head_inputs(images), head_inputs(texts), cosine, return_attention,
                              grid=(len(images), len(texts)))

    # ---- block shape --------------------------------------------------------------------------
    def auto_block_pairs(self, images: Encoding, texts: Encoding) -> int:
        """Pairs per exhaustive block. On CPU the attended vectors of a block (all streams) are
        kept near 1M floats per thread (4 MB, about a core's L2 cache), at least 128 pairs: the
        memory-bound element-wise work between the matrix products runs much faster on blocks
        that fit in the caches (benchmarks/scoring_throughput.py measures it). On a GPU large
        blocks (4,096 pairs) keep the device busy."""
        kind = self.model.head_kind
        if not kind.cross_attention:
            return 65536
        if images.units.device.type != "cpu":
            return 4096
        streams = kind.score_streams(self.model.config)
        units = sum(images.units.shape[1] if s == "i2t" else texts.units.shape[1] for s in streams)
        budget = 1_000_000 * min(4, torch.get_num_threads())  # floats of attended vectors per block
        return int(min(4096, max(128, budget // max(1, units * images.units.shape[2]))))

    def block_shape(self, images: Encoding, texts: Encoding, block_pairs: int | None = None) -> tuple[int, int]:
        """(images, texts) per exhaustive block of about ``block_pairs`` pairs (default
        :meth:`auto_block_pairs`): as many texts as fit, evened out over the blocks (less padding
        when compiled), then as many images as the rest allows."""
        ni, nt = len(images), len(texts)
        if block_pairs is None:
            block_pairs = self.auto_block_pairs(images, texts)
        bt = min(nt, max(1, block_pairs))
        bt = -(-nt // -(-nt // bt))  # the same number of blocks, evened out
        return min(ni, max(1, block_pairs // bt)), bt

    # ---- exhaustive scoring -------------------------------------------------------------------
    def exhaustive(self, images: Encoding, texts: Encoding, block_pairs: int | None = None,
                   progress: bool = False, return_attention: bool = False, compile: bool = False,
                   precision: str = "auto") -> TSHSROutput:
        """All pairs, [n_images, n_texts], block by block (see ``TSHSRModel.score_encoded``)."""
        if len(images) == 0 or len(texts) == 0:
            raise InvalidInputError("Need at least one image and one text to score")
        autocast = autocast_context(images.device, precision)
        if autocast is not None:
            with autocast:
                return self.exhaustive(images, texts, block_pairs, progress, return_attention, compile, "fp32")
        bi, bt = self.block_shape(images, texts, block_pairs)
        if compile and not return_attention:
            return self._exhaustive_compiled(images, texts, bi, bt, progress)
        return self._exhaustive_eager(images, texts, bi, bt, progress, return_attention)

    def _exhaustive_eager(self, images, texts, bi, bt, progress, return_attention) -> TSHSROutput:
        ni, nt, device = len(images), len(texts), images.device
        keys = self.model.contribution_keys
        scores, cosine = torch.empty(ni, nt, device=device), torch.empty(ni, nt, device=device)
        parts = {k: torch.empty(ni, nt, device=device) for k in keys}
        levels = {k: torch.empty(ni, nt, device=device) for k in keys}
        streams: dict[str, torch.Tensor] = {}
        attn: dict = {}
        weights = {}
        blocks = [(i, t) for i in range(0, ni, bi) for t in range(0, nt, bt)]
        for i0, t0 in tqdm(blocks, desc="score", disable=not progress, unit="block"):
            ii = torch.arange(i0, min(i0 + bi, ni), device=device)
            tt = torch.arange(t0, min(t0 + bt, nt), device=device)
            out = self._grid(images[i0:i0 + bi], texts[t0:t0 + bt], return_attention)
            shape, at = (len(ii), len(tt)), (ii[:, None], tt[None, :])

            def grid(t: torch.Tensor) -> torch.Tensor:  # a block's values as [bi, bt] fp32 (bf16 under autocast)
                return t.view(shape).float()

            scores[at] = grid(out.scores)
            cosine[at] = grid(out.global_similarity)
            for k in keys:
                parts[k][at] = grid(out.contributions[k])
                levels[k][at] = grid(out.level_scores[k])
            for s, v in out.stream_scores.items():
                streams.setdefault(s, torch.empty(ni, nt, device=device))[at] = grid(v)
            weights = out.weights
            for s, smaps in (out.attentions or {}).items():
                for name, value in smaps.items():
                    attn.setdefault(s, {}).setdefault(name, []).append(
                        (ii, tt, value.view(*shape, *value.shape[1:]).float()))
        attentions = None
        if return_attention:
            attentions = {s: {name: _assemble(chunks, ni, nt) for name, chunks in smaps.items()}
                          for s, smaps in attn.items()}
        return TSHSROutput(scores=scores, contributions=parts, level_scores=levels, weights=weights,
                           stream_scores=streams, global_similarity=cosine, attentions=attentions)

    def _block_tensors(self, img: dict, txt: dict, n_images: int, n_texts: int):
        """One exhaustive block as a tuple of tensors (scores, contributions, level scores, stream
        scores, cosine): the unit that ``torch.compile`` fuses."""
        cosine = (img["embedding"] @ txt["embedding"].T).reshape(-1)
        out = self.run_heads(img, txt, cosine, False, grid=(n_images, n_texts))
        keys = self.model.contribution_keys
        return (out.scores, torch.stack([out.contributions[k] for k in keys]),
                torch.stack([out.level_scores[k] for k in keys]),
                torch.stack([out.stream_scores[s] for s in sorted(out.stream_scores)]), cosine)

    def _exhaustive_compiled(self, images: Encoding, texts: Encoding, bi: int, bt: int,
                             progress: bool) -> TSHSROutput:
        if self._compiled_block is None:
            self._compiled_block = torch.compile(self._block_tensors, dynamic=False)
        ni, nt, device = len(images), len(texts), images.device
        keys = self.model.contribution_keys
        scores, cosine = torch.empty(ni, nt, device=device), torch.empty(ni, nt, device=device)
        parts = torch.empty(len(keys), ni, nt, device=device)
        levels = torch.empty(len(keys), ni, nt, device=device)
        stream_names = sorted({k.split("/")[0] for k in keys})
        streams = torch.empty(len(stream_names), ni, nt, device=device)

        def padded(n0: int, size: int, n: int) -> torch.Tensor:  # indices of one block, padded to size
            idx = torch.arange(n0, min(n0 + size, n), device=device)
            return torch.cat([idx, idx[-1:].expand(size - len(idx))]) if len(idx) < size else idx

        blocks = [(i, t) for i in range(0, ni, bi) for t in range(0, nt, bt)]
        for i0, t0 in tqdm(blocks, desc="score", disable=not progress, unit="block"):
            mi, mt = min(bi, ni - i0), min(bt, nt - t0)
            # Full blocks are views (no copy); only the last, short ones are padded to the shape.
            img = head_inputs(images[i0:i0 + bi]) if mi == bi else head_inputs(images, padded(i0, bi, ni))
            txt = head_inputs(texts[t0:t0 + bt]) if mt == bt else head_inputs(texts, padded(t0, bt, nt))
            try:
                block = self._compiled_block(img, txt, bi, bt)
            except Exception as err:  # inductor's failures (no compiler, unsupported op) are long and deep
                if (i0, t0) != blocks[0]:
                    raise
                self._compiled_block = None
                raise RuntimeError(f"torch.compile could not build the scoring block ({type(err).__name__}: "
                                   f"{str(err).splitlines()[0] if str(err) else ''}); on CPU it needs a working "
                                   "C++ compiler (g++). Score without compile instead.") from err
            s, c, lv, st, cos = (x.view(*x.shape[:-1], bi, bt)[..., :mi, :mt] for x in block)
            scores[i0:i0 + mi, t0:t0 + mt] = s
            parts[:, i0:i0 + mi, t0:t0 + mt] = c
            levels[:, i0:i0 + mi, t0:t0 + mt] = lv
            streams[:, i0:i0 + mi, t0:t0 + mt] = st
            cosine[i0:i0 + mi, t0:t0 + mt] = cos
        return TSHSROutput(scores=scores, contributions=dict(zip(keys, parts)), level_scores=dict(zip(keys, levels)),
                           weights=self.model.mixing_weights(), stream_scores=dict(zip(stream_names, streams)),
                           global_similarity=cosine)


def _assemble(chunks, ni: int, nt: int) -> torch.Tensor:
    """Put per-block attention maps back into one [ni, nt, ...] tensor (units padded to the max)."""
    trailing = [max(c[2].shape[2 + d] for c in chunks) for d in range(chunks[0][2].dim() - 2)]
    out = torch.zeros(ni, nt, *trailing, device=chunks[0][2].device)
    for ii, tt, value in chunks:
        index = (ii[:, None], tt[None, :]) + tuple(slice(0, s) for s in value.shape[2:])
        out[index] = value
    return out
