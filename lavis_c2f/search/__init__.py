"""User-facing search tools around :class:`lavis_c2f.predictor.C2FPredictor`.

* :mod:`.format`: clock times (``mm:ss``) and the result table.
* :mod:`.plot`: the saliency plot of ``lavis-c2f search --plot``.
* :mod:`.annotate`: fine-grained moment annotations from video-level captions.
* :mod:`.cli`: ``lavis-c2f search`` and ``lavis-c2f annotate``.

Importing this package is light (numpy only); the commands import the models when they run.
"""
