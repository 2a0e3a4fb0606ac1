"""The demo app behind ``app.py``: :mod:`tshsr_app.engine` computes (model, galleries, ranking,
explanation; no web code), :mod:`tshsr_app.page` is the Gradio page and API over it. ``app.py``
is the entry point (options, start-up, the module-level ``demo`` a Space looks for)."""
