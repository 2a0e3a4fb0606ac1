"""Turn a :class:`~tshsr.scoring.TSHSROutput` into things a person can look at.

Pure functions over numbers the model returned (numpy, PIL and matplotlib's object API, no
pyplot global state and no web framework): the per-stream/per-level breakdown of scores as a
stacked bar chart, and the attention behind one (image, caption) pair as heatmaps over the photo
(each word over the image regions) and as the words each region attended to most. Nothing here
recomputes a score; the plots draw ``contributions`` and ``attentions`` exactly as given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = [
    "PairAttention",
    "key_label",
    "key_color",
    "contribution_figure",
    "pair_attention",
    "upsample",
    "overlay_heatmap",
    "word_heatmaps",
    "region_top_words",
    "region_words_figure",
]

STREAM_NAMES = {"i2t": "image→text", "t2i": "text→image", "dual": "dual encoder"}
# One hue per stream, one shade per level: the stream reads first, the level second.
_SHADES = {
    "i2t": {"local": "#08519c", "context": "#4292c6", "global": "#9ecae1"},
    "t2i": {"local": "#a63603", "context": "#f16913", "global": "#fdae6b"},
    "dual": {"global": "#6a51a3"},
}
_FALLBACK = ["#31a354", "#756bb1", "#636363", "#e7298a", "#66a61e", "#e6ab02"]


def key_label(key: str) -> str:
    """"i2t/local" -> "image→text · local"."""
    stream, _, level = key.partition("/")
    return f"{STREAM_NAMES.get(stream, stream)} · {level}" if level else STREAM_NAMES.get(stream, stream)


def key_color(key: str, index: int = 0) -> str:
    stream, _, level = key.partition("/")
    return _SHADES.get(stream, {}).get(level) or _FALLBACK[index % len(_FALLBACK)]


# ----------------------------------------------------------------------------------------------
# Score breakdown
# ----------------------------------------------------------------------------------------------
def contribution_figure(contributions: Sequence[Mapping[str, float]], labels: Sequence[str],
                        scores: Sequence[float] | None = None, keys: Sequence[str] | None = None,
                        title: str | None = None, max_label_chars: int = 48):
    """Horizontal stacked bars, one per match (first on top), one segment per stream/level key.

    Positive contributions stack rightwards from zero and negative ones leftwards, so each bar's
    extent shows exactly what pushed the score up and down; a black diamond marks the total
    (``scores``, or the sum of the row when not given).
    """
    from matplotlib.figure import Figure

    if len(contributions) != len(labels):
        raise ValueError(f"{len(contributions)} rows of contributions but {len(labels)} labels")
    if keys is None:
        keys = list(dict.fromkeys(k for row in contributions for k in row))
    n = len(contributions)
    totals = [float(s) for s in scores] if scores is not None else [float(sum(r.values())) for r in contributions]
    height = 1.9 + 0.42 * max(n, 1)
    fig = Figure(figsize=(8.0, height), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(n)[::-1]  # first row on top
    pos_left = np.zeros(n)
    neg_left = np.zeros(n)
    for index, key in enumerate(keys):
        values = np.array([float(row.get(key, 0.0)) for row in contributions])
        positive = np.where(values > 0, values, 0.0)
        negative = np.where(values < 0, values, 0.0)
        color = key_color(key, index)
        ax.barh(y, positive, left=pos_left, color=color, height=0.7, label=key_label(key),
                edgecolor="white", linewidth=0.5)
        if negative.any():
            ax.barh(y, negative, left=neg_left, color=color, height=0.7, edgecolor="white", linewidth=0.5,
                    hatch="//")
        pos_left += positive
        neg_left += negative
    ax.scatter(totals, y, marker="D", color="black", s=22, zorder=3, label="total score")
    span = max(np.max(pos_left, initial=0.0), 1e-6) - min(np.min(neg_left, initial=0.0), 0.0)
    for yi, total, right in zip(y, totals, pos_left):
        ax.text(max(right, total) + 0.01 * span, yi, f"{total:.3f}", va="center", fontsize=8)
    short = [lab if len(lab) <= max_label_chars else lab[: max_label_chars - 1] + "…" for lab in labels]
    ax.set_yticks(y, short, fontsize=8)
    ax.axvline(0.0, color="#444444", linewidth=0.8)
    ax.set_xlim(min(np.min(neg_left, initial=0.0), 0.0) - 0.02 * span, np.max(pos_left, initial=0.0) + 0.14 * span)
    ax.set_xlabel("contribution to the score (weight × level score)", fontsize=9)
    if title:
        ax.set_title(title, fontsize=10)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=4, fontsize=7, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    return fig


# ----------------------------------------------------------------------------------------------
# Attention of one pair
# ----------------------------------------------------------------------------------------------
@dataclass
class PairAttention:
    """The attention maps of one (image, caption) pair, trimmed to the caption's real words.

    word_to_region [L, K]: each word's attention over the K image regions (text→image stream).
    word_weights [L]: how much each word counts in that stream's local score.
    region_to_word [K, L]: each region's attention over the words (image→text stream).
    region_weights [K]: how much each region counts in that stream's local score.
    word_match [L] / region_match [K] (models with alignment levels): each word's / region's
    cosine with what it attended to; their mean is the alignment part of the stream's local score.
    grid: (rows, cols) of the regions when they form a grid (region k is cell (k // cols, k % cols)).
    """

    tokens: list[str]
    grid: tuple[int, int] | None
    word_to_region: np.ndarray | None = None
    word_weights: np.ndarray | None = None
    region_to_word: np.ndarray | None = None
    region_weights: np.ndarray | None = None
    word_match: np.ndarray | None = None
    region_match: np.ndarray | None = None

    @property
    def has_maps(self) -> bool:
        return self.word_to_region is not None or self.region_to_word is not None


def _numpy(tensor) -> np.ndarray:
    if hasattr(tensor, "detach"):
        tensor = tensor.detach().float().cpu().numpy()
    return np.asarray(tensor, dtype=np.float64)


def pair_attention(out, image_index: int = 0, text_index: int = 0) -> PairAttention:
    """Extract one pair's maps from a ``TSHSROutput`` scored with ``return_attention=True``."""
    if out.text_tokens is None:
        raise ValueError("the output carries no text tokens: score with model.score(..., return_attention=True)")
    tokens = list(out.text_tokens[text_index])
    n_words = len(tokens)
    grid = tuple(out.image_grid) if out.image_grid is not None else None
    maps = out.attentions or {}
    result = PairAttention(tokens=tokens, grid=grid)
    t2i = maps.get("t2i", {})
    if "attention" in t2i:
        attention = _numpy(t2i["attention"][image_index, text_index])  # [L_pad, K]
        n_words = min(n_words, attention.shape[0])
        result.word_to_region = attention[:n_words]
        if "local_weights" in t2i:
            result.word_weights = _numpy(t2i["local_weights"][image_index, text_index])[:n_words]
        if "unit_alignment" in t2i:
            result.word_match = _numpy(t2i["unit_alignment"][image_index, text_index])[:n_words]
    i2t = maps.get("i2t", {})
    if "attention" in i2t:
        attention = _numpy(i2t["attention"][image_index, text_index])  # [K, L_pad]
        n_words = min(n_words, attention.shape[1])
        result.region_to_word = attention[:, :n_words]
        if "local_weights" in i2t:
            result.region_weights = _numpy(i2t["local_weights"][image_index, text_index])
        if "unit_alignment" in i2t:
            result.region_match = _numpy(i2t["unit_alignment"][image_index, text_index])
    result.tokens = tokens[:n_words]
    if result.word_to_region is not None:
        result.word_to_region = result.word_to_region[:n_words]
        if result.word_weights is not None:
            result.word_weights = result.word_weights[:n_words]
        if result.word_match is not None:
            result.word_match = result.word_match[:n_words]
    n_regions = (result.word_to_region.shape[1] if result.word_to_region is not None
                 else result.region_to_word.shape[0] if result.region_to_word is not None else None)
    if grid is not None and n_regions is not None and grid[0] * grid[1] != n_regions:
        raise ValueError(f"image grid {grid} does not hold the {n_regions} regions of the attention maps")
    return result


def upsample(cells: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A [rows, cols] map resized bilinearly to ``size`` = (width, height) of the photo.

    The processor resizes the whole photo to the backbone's square input without cropping, so the
    region grid covers the whole photo and cell (r, c) maps to the same fraction of it.
    """
    cells = np.asarray(cells, dtype=np.float32)
    if cells.ndim != 2:
        raise ValueError(f"expected a 2-D map, got shape {cells.shape}")
    resized = Image.fromarray(cells, mode="F").resize(size, Image.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def overlay_heatmap(image: Image.Image, cells: np.ndarray, alpha: float = 0.55, cmap: str = "inferno") -> Image.Image:
    """The photo with ``cells`` (a [rows, cols] map, scaled to its own maximum) laid over it."""
    from matplotlib import colormaps

    image = image.convert("RGB")
    heat = upsample(cells, image.size)
    peak = float(heat.max())
    heat = heat / peak if peak > 0 else heat
    colored = colormaps[cmap](np.clip(heat, 0.0, 1.0))[..., :3]
    # Weak attention leaves the photo visible, strong attention colours it.
    weight = (alpha * np.clip(heat, 0.0, 1.0) ** 0.7)[..., None]
    base = np.asarray(image, dtype=np.float32) / 255.0
    mixed = base * (1 - weight) + colored * weight
    return Image.fromarray((mixed * 255).round().astype(np.uint8))


def word_heatmaps(image: Image.Image, attention: PairAttention, max_words: int | None = None,
                  max_side: int = 320) -> list[tuple[Image.Image, str]]:
    """One overlay per word: where in the photo the word looked (text→image attention)."""
    if attention.word_to_region is None or attention.grid is None:
        return []
    small = image.convert("RGB")
    small.thumbnail((max_side, max_side))
    rows, cols = attention.grid
    results = []
    words = attention.word_to_region if max_words is None else attention.word_to_region[:max_words]
    for index, row in enumerate(words):
        weight = "" if attention.word_weights is None else f", weight {attention.word_weights[index]:.2f}"
        if attention.word_match is not None:
            weight += f", match {attention.word_match[index]:.2f}"
        label = f"{attention.tokens[index]} (peak {row.max():.2f}{weight})"
        results.append((overlay_heatmap(small, row.reshape(rows, cols)), label))
    return results


def region_top_words(attention: PairAttention, k: int = 3) -> list[dict]:
    """For each region, the ``k`` words it attended to most (image→text attention), regions
    ordered by how well they match what they attended to (``region_match``, models with alignment
    levels), else by how much they count in the image→text local readout, else by index."""
    if attention.region_to_word is None:
        return []
    n_regions, n_words = attention.region_to_word.shape
    weights, match = attention.region_weights, attention.region_match
    key = match if match is not None else weights
    order = range(n_regions) if key is None else np.argsort(-key, kind="stable")
    cols = attention.grid[1] if attention.grid is not None else None
    rows = []
    for region in order:
        region = int(region)
        dist = attention.region_to_word[region]
        top = np.argsort(-dist, kind="stable")[: min(k, n_words)]
        rows.append({
            "region": region,
            "cell": None if cols is None else (region // cols, region % cols),
            "weight": None if weights is None else float(weights[region]),
            "match": None if match is None else float(match[region]),
            "words": [(attention.tokens[int(j)], float(dist[int(j)])) for j in top],
        })
    return rows


def region_words_figure(image: Image.Image, attention: PairAttention,
                        title: str | None = "Each image region's most-attended word (image→text)"):
    """The photo divided into its region grid; each cell names the word it attended to most,
    and cells that count more in the image→text local score are drawn more opaque."""
    from matplotlib.figure import Figure

    if attention.region_to_word is None or attention.grid is None:
        return None
    rows, cols = attention.grid
    image = image.convert("RGB")
    width, height = image.size
    aspect = height / max(width, 1)
    fig_w, fig_h = 6.4, 6.4 * aspect
    if fig_h > 6.4:  # portrait: keep the height of a square figure
        fig_w, fig_h = max(3.0, 6.4 / aspect), 6.4
    fig = Figure(figsize=(fig_w, max(2.5, fig_h)), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(np.asarray(image), extent=(0, cols, rows, 0), aspect="auto")
    weights = attention.region_weights
    scaled = None if weights is None else weights / max(float(weights.max()), 1e-12)
    for region in range(rows * cols):
        r, c = divmod(region, cols)
        dist = attention.region_to_word[region]
        word = attention.tokens[int(np.argmax(dist))]
        strength = 1.0 if scaled is None else float(scaled[region])
        ax.text(c + 0.5, r + 0.5, word, ha="center", va="center", fontsize=7, color="white",
                alpha=0.35 + 0.65 * strength,
                bbox={"boxstyle": "round,pad=0.15", "facecolor": "black", "alpha": 0.15 + 0.6 * strength,
                      "linewidth": 0})
    for r in range(rows + 1):
        ax.axhline(r, color="white", linewidth=0.5, alpha=0.6)
    for c in range(cols + 1):
        ax.axvline(c, color="white", linewidth=0.5, alpha=0.6)
    ax.set_xlim(0, cols)
    ax.set_ylim(rows, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=10)
    return fig
