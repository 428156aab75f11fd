"""The HTTP search service (``lavis-c2f serve``).

* :mod:`.schemas`: request / response bodies (pydantic) and the limits of a request.
* :mod:`.app`: the FastAPI app over a :class:`~lavis_c2f.predictor.C2FPredictor`.
* :mod:`.cli`: the command (uvicorn).
"""
