"""The demo's Gradio page and named API endpoints, over a :class:`~tshsr_app.engine.DemoEngine`.

Every handler turns bad input into a ``gr.Error`` carrying the engine's message (a message in the
page or from the API, never a crash); the figures come from :mod:`tshsr.explain`.
"""

from __future__ import annotations

import functools
import logging
import shutil
import traceback

import gradio as gr

from tshsr import InvalidInputError
from tshsr.explain import contribution_figure
from tshsr.processing import MAX_IMAGE_PIXELS

from .engine import MAX_SESSION_UPLOADS, MAX_TOP_K, MAX_USER_CAPTIONS, DemoEngine, _short

SESSION_TTL_S = 3600  # a session's added photos are deleted this long after its last use

log = logging.getLogger("tshsr.app")


def user_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except InvalidInputError as exc:
            raise gr.Error(str(exc), title="Cannot use this input") from exc
        except Exception as exc:  # a bug must not take the app down; log it, tell the user
            log.error("request failed:\n%s", traceback.format_exc())
            raise gr.Error(f"Something went wrong ({type(exc).__name__}); the app is still running, "
                           "try another input", title="Internal error") from exc
    return wrapper


def _breakdown(result: dict, label: str, noun: str):
    """The stacked-bar figure of a ranking's parts, and its notes shown as warnings."""
    for note in result["notes"]:
        gr.Warning(note)
    rows = result["results"]
    return contribution_figure(
        [r["contributions"] for r in rows], [f"#{r['rank']} {r[label]}" for r in rows],
        scores=[r["score"] for r in rows], keys=result["keys"],
        title=f"Top {len(rows)} of {result['candidates']} {noun}: score = sum of the parts")


class Handlers:
    """The functions behind every UI event and API endpoint, bound to one engine."""

    def __init__(self, engine: DemoEngine):
        self.engine = engine

    # ---- API (JSON in, JSON out) ----
    def api_rank_captions(self, image_file, captions, top_k):
        return user_errors(self.engine.rank_captions)(image_file, captions or "", top_k, True)

    def api_rank_images(self, text, top_k):
        return user_errors(self.engine.rank_images)(text, top_k, None)

    # ---- UI ----
    def _explain_outputs(self, image, caption):
        ex = self.engine.explain(image, caption)
        return ex.summary, ex.word_maps, ex.region_figure, ex.region_rows

    def ui_rank_captions(self, image, captions, use_pool, top_k):
        @user_errors
        def run():
            result = self.engine.rank_captions(image, captions, top_k, bool(use_pool))
            figure = _breakdown(result, "caption", "captions")
            rows = result["results"]
            table = [[r["rank"], round(r["score"], 4), r["caption"], r["source"]] for r in rows]
            choices = [f"#{r['rank']}  {_short(r['caption'], 80)}" for r in rows]
            state = {"image": image, "captions": [r["caption"] for r in rows]}
            return (table, figure, gr.update(choices=choices, value=choices[0], interactive=True), state,
                    *self._explain_outputs(image, rows[0]["caption"]))
        return run()

    def ui_explain_caption(self, state, choice):
        @user_errors
        def run():
            if not state or not choice:
                raise InvalidInputError("Rank some captions first")
            index = int(str(choice).split()[0].lstrip("#")) - 1
            return self._explain_outputs(state["image"], state["captions"][index])
        return run()

    def ui_add_photos(self, files, session):
        @user_errors
        def run():
            new_session, added, problems = self.engine.add_photos(session, files)
            for problem in problems:
                gr.Warning(problem)
            if not added and problems:
                raise InvalidInputError("No photo was added: " + "; ".join(problems[:3]))
            status = (f"Added {len(added)} photo(s); the gallery now has {len(self.engine.gallery)} built-in + "
                      f"{len(new_session)} of yours (limit {MAX_SESSION_UPLOADS}).")
            return new_session, status, None
        return run()

    def ui_rank_images(self, text, top_k, session):
        @user_errors
        def run():
            result = self.engine.rank_images(text, top_k, session)
            figure = _breakdown(result, "image", "photos")
            rows = result["results"]
            paths = [self.engine.image_path(r["image"], session) for r in rows]
            gallery = [(p, f"#{r['rank']}  {r['score']:.3f}  {r['image']}") for p, r in zip(paths, rows)]
            query = result["query"]["text"]
            state = {"text": query, "images": paths, "names": [r["image"] for r in rows]}
            header = (f"Explaining **#1 {rows[0]['image']}** of {result['candidates']} photos ranked "
                      "(click another photo to explain it)")
            return (gallery, figure, state, header, *self._explain_outputs(paths[0], query))
        return run()

    def ui_explain_image(self, state, evt: gr.SelectData):
        @user_errors
        def run():
            if not state:
                raise InvalidInputError("Search for a caption first")
            index = evt.index if isinstance(evt.index, int) else evt.index[0]
            header = f"Explaining **#{index + 1} {state['names'][index]}**"
            return (header, *self._explain_outputs(state["images"][index], state["text"]))
        return run()


def friendly_image_errors(component: gr.Image) -> gr.Image:
    """Make an unreadable upload to ``component`` a clear message instead of a decoder traceback.

    gr.Image opens the upload with PIL before our handler runs. This wraps that one instance's
    preprocess (a subclass would make Gradio write an ``app.pyi`` stub next to this file)."""
    original = component.preprocess

    @functools.wraps(original)
    def preprocess(payload):
        try:
            return original(payload)
        except gr.Error:
            raise
        except Exception as exc:  # PIL could not even read the header
            if "DecompressionBomb" in type(exc).__name__:
                message = f"The image is too large to process safely (limit {MAX_IMAGE_PIXELS:,} pixels)"
            else:
                message = f"Not a readable image ({type(exc).__name__})"
            raise gr.Error(message, title="Cannot use this input") from exc

    component.preprocess = preprocess
    return component


# ----------------------------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------------------------
INTRO = """# TSHSR image–text matching
Two-stream Hierarchical Similarity Reasoning: every score is the sum of six parts, two **streams**
(image→text: each image region looks for words; text→image: each word looks for regions) times three
**levels** (local words/regions, context phrases/neighbourhoods, global whole image/sentence).
The bars show these parts exactly as the model returned them; the heatmaps show the attention behind one match."""


def weights_note(weights: dict[str, float]) -> str:
    """A sentence naming the parts whose score weight is 0 in this model (their bars are always
    empty), or "" when every part has a share of the score."""
    silent = [key for key, w in weights.items() if w == 0.0]
    if not silent:
        return ""
    streams = {key.split("/", 1)[0] for key in weights}
    levels = {key.split("/", 1)[1] for key in silent}
    whole = [lv for lv in dict.fromkeys(k.split("/", 1)[1] for k in silent)
             if all(f"{st}/{lv}" in silent for st in streams)]
    if len(whole) == len(levels) and "global" not in levels:
        one = len(whole) == 1
        return (f"In this model the {' and '.join(whole)} {'level has' if one else 'levels have'} no weight in the "
                f"score: {'it feeds' if one else 'they feed'} the global level through the reasoning, so "
                f"{'its' if one else 'their'} bars are empty by design.")
    return f"Parts with no weight in this model's score (their bars are empty): {', '.join(silent)}."


def _explain_row(label: str):
    """The components that explain one match: summary, word heatmaps, region plot, region table."""
    summary = gr.Markdown()
    with gr.Row():
        words = gr.Gallery(label="Where each word looked (text→image attention)", columns=4, height=360,
                           elem_id=f"{label}-word-maps" if label else None)
        regions = gr.Plot(label="Most-attended word of each region (image→text)")
    table = gr.Dataframe(headers=["region", "match", "readout weight", "top words (attention)"],
                         label="Regions that match best (image→text: each region's cosine with the words it "
                               "attended to; their mean is the alignment part of the local score)",
                         interactive=False)
    return [summary, words, regions, table]


def _captions_tab(engine: DemoEngine, handlers: Handlers) -> None:
    with gr.Row():
        with gr.Column(scale=1):
            photo = friendly_image_errors(gr.Image(
                type="filepath", label="Photo", sources=["upload", "clipboard"], height=300, elem_id="photo-input"))
            if engine.example_photos:
                gr.Examples(engine.example_photos, inputs=photo, label="Example photos", examples_per_page=12)
            extra = gr.Textbox(label="Your captions (optional, one a line)", lines=4,
                               placeholder="a dog runs on the beach\ntwo people ride bicycles", elem_id="extra-captions")
            use_pool = gr.Checkbox(value=bool(engine.pool),
                                   label=f"Also rank the built-in pool ({len(engine.pool)} captions)")
            top_k = gr.Slider(1, MAX_TOP_K, value=5, step=1, label="Top K")
            rank = gr.Button("Rank captions", variant="primary", elem_id="rank-captions")
        with gr.Column(scale=2):
            table = gr.Dataframe(headers=["rank", "score", "caption", "source"], label="Ranked captions",
                                 interactive=False, wrap=True, column_widths=["9%", "11%", "64%", "16%"],
                                 elem_id="ranked-captions")
            plot = gr.Plot(label="Score breakdown by stream and level", elem_id="captions-plot")
    gr.Markdown("### Why this caption? The attention behind one match")
    choice = gr.Dropdown(label="Match to explain", choices=[], interactive=True)
    explain = _explain_row("captions")
    state = gr.State(None)
    rank.click(handlers.ui_rank_captions, [photo, extra, use_pool, top_k], [table, plot, choice, state, *explain],
               api_visibility="private")
    choice.input(handlers.ui_explain_caption, [state, choice], explain, api_visibility="private")


def _images_tab(handlers: Handlers) -> None:
    with gr.Row():
        with gr.Column(scale=1):
            query = gr.Textbox(label="Caption", placeholder="a dog running through the snow", elem_id="query-caption")
            top_k = gr.Slider(1, MAX_TOP_K, value=8, step=1, label="Top K", elem_id="top-k-images")
            rank = gr.Button("Find photos", variant="primary", elem_id="rank-images")
            uploads = gr.File(label=f"Add your photos to the gallery (up to {MAX_SESSION_UPLOADS}, only you see them)",
                              file_count="multiple", file_types=["image"], elem_id="add-photos-files")
            add = gr.Button("Add photos", elem_id="add-photos")
            status = gr.Markdown(elem_id="upload-status")
        with gr.Column(scale=2):
            gallery = gr.Gallery(label="Ranked photos", columns=4, height=420, elem_id="ranked-images")
            plot = gr.Plot(label="Score breakdown by stream and level", elem_id="images-plot")
    header = gr.Markdown("### Why this photo?", elem_id="explain-header")
    explain = _explain_row("")
    state = gr.State(None)
    session = gr.State(None, time_to_live=SESSION_TTL_S,
                       delete_callback=lambda s: s is not None and shutil.rmtree(s.folder, True))
    gr.on([rank.click, query.submit], handlers.ui_rank_images, [query, top_k, session],
          [gallery, plot, state, header, *explain], api_visibility="private")
    gallery.select(handlers.ui_explain_image, [state], [header, *explain], api_visibility="private")
    add.click(handlers.ui_add_photos, [uploads, session], [session, status, uploads], api_visibility="private")


def _api_endpoints(handlers: Handlers) -> None:
    """Named API endpoints: hidden components, JSON out (docs/APP.md)."""
    with gr.Group(visible=False):
        image = gr.File(label="image", type="filepath")
        captions = gr.Textbox(label="captions", value="")
        top_k_captions = gr.Number(label="top_k", value=5)
        text = gr.Textbox(label="text")
        top_k_images = gr.Number(label="top_k", value=5)
        ranked_captions = gr.JSON(label="ranked_captions")
        ranked_images = gr.JSON(label="ranked_images")
        captions_button, images_button = gr.Button(), gr.Button()
    captions_button.click(
        handlers.api_rank_captions, [image, captions, top_k_captions], ranked_captions, api_name="rank_captions",
        api_description="Rank the built-in caption pool plus newline-separated `captions` for an image file; "
                        "returns the top_k with score and per-stream/level parts.")
    images_button.click(
        handlers.api_rank_images, [text, top_k_images], ranked_images, api_name="rank_images",
        api_description="Rank the built-in photo gallery for a caption; returns the top_k with score and "
                        "per-stream/level parts.")


def build_demo(engine: DemoEngine, max_upload_size: str = "10mb") -> gr.Blocks:
    """The whole page; ``max_upload_size`` is only stated here (the server enforces it at launch)."""
    handlers = Handlers(engine)
    limits = (f"Limits: top K up to {MAX_TOP_K}; up to {MAX_USER_CAPTIONS:,} pasted captions; uploads up to "
              f"{max_upload_size} and {MAX_IMAGE_PIXELS:,} pixels; {MAX_SESSION_UPLOADS} added photos a session.")
    with gr.Blocks(title="TSHSR image-text matching") as demo:
        gr.Markdown(INTRO)
        note = weights_note(engine.model.mixing_weights())
        gr.Markdown(f"Model: `{engine.model_name}` · gallery: {len(engine.gallery)} photos · caption pool: "
                    f"{len(engine.pool)} captions. {note + ' ' if note else ''}{limits}")
        with gr.Tab("Image → captions"):
            _captions_tab(engine, handlers)
        with gr.Tab("Caption → images"):
            _images_tab(handlers)
        _api_endpoints(handlers)
    return demo
