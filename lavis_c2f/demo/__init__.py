"""``lavis-c2f demo``: a local web app (Streamlit) around :class:`lavis_c2f.predictor.C2FPredictor`.

* :mod:`.cli`: the ``demo`` sub-command (starts ``streamlit run`` on :mod:`.app`).
* :mod:`.app`: the Streamlit script (presentation only).
* :mod:`.sources`: what the app searches (quickstart runs, indexes, uploaded videos), predictor
  construction, indexing with progress, the quickstart as a subprocess.
* :mod:`.thumbs`: result thumbnails (a decoded frame, or a saliency sparkline for the demo corpus).
* :mod:`.messages`: exceptions -> one-line messages for the UI.

Importing this package is light (no Streamlit, torch or LAVIS); see ``docs/demo.md``.
"""
