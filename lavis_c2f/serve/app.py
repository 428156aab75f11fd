"""The HTTP search service: a FastAPI app over one :class:`~lavis_c2f.predictor.C2FPredictor`.

Endpoints (bodies in :mod:`lavis_c2f.serve.schemas`)::

    POST /search          {"query": "..." | ["...", ...], "top_k": 10, "stage1_top_k": 10,
                           "ground": true, "refine": null}   -> {"results": [one per query]}
    GET  /health          status, number of videos, the mode of each stage
    GET  /videos/{vid}    duration, clip length and count, file of an indexed video
    GET  /docs            the OpenAPI page (Swagger UI served locally: nothing from a CDN);
                          /redoc, /openapi.json

A search is :meth:`C2FPredictor.search_batch` (the queries of a request in one run of the
coarse-to-fine engine, the same engine as ``lavis-c2f search`` and the web demo), or
:meth:`C2FPredictor.stage1_batch` with ``"ground": false``. The models are not thread-safe
and a search keeps the CPU / GPU busy, so searches run one at a time (a lock); ``/health``
answers meanwhile.

Errors are JSON ``{"error", "message", ...}`` (:class:`~lavis_c2f.serve.schemas.ErrorOut`):

* 422 for a bad request (invalid JSON, an empty query, an unknown field, ``top_k`` out of
  range, ``refine`` without a refiner); ``message`` names each field (``top_k: ...``);
* 404 for an unknown video or path;
* 503 while the index store (a Milvus server shared by several replicas) does not answer within
  the index's timeout (:class:`~lavis_c2f.common.errors.IndexUnavailableError`): the message
  names the store, with a ``Retry-After`` header; ``/health`` then answers 503 too. The next
  request tries the store again, so the service recovers by itself when the store is back;
* 500 for an internal error: logged with its traceback and a request id, and the body has the
  id but no traceback.

Before each search the corpus catches up with writes that other processes made to a live
store (:meth:`~lavis_c2f.index.corpora.Corpus.refresh`: ``index add`` / ``index remove`` on a
Milvus collection), so no restart is needed (docs/serve.md, "Consistency").
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any, Callable, Dict, List, Sequence, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from lavis_c2f.common.errors import IndexUnavailableError
from lavis_c2f.serve.schemas import SERVE_DEFAULTS, ErrorOut, HealthOut, SearchRequest, SearchResponse, VideoOut
from lavis_c2f.version import __version__

logger = logging.getLogger(__name__)

T = TypeVar("T")
_ERRORS = {422: {"model": ErrorOut, "description": "bad request: the message names the field"},
           500: {"model": ErrorOut, "description": "internal error (logged by the server with the request id)"},
           503: {"model": ErrorOut, "description": "the index store (a Milvus server) does not answer; retry later"}}
_RETRY_AFTER = {"Retry-After": str(SERVE_DEFAULTS["store_retry_after_s"])}   # headers of a 503


class InternalError(Exception):
    """An unexpected failure, already logged under ``request_id``."""

    def __init__(self, request_id: str):
        super().__init__(request_id)
        self.request_id = request_id


def _field(loc: Sequence[Any]) -> str:
    """``("body", "query", 1)`` -> ``query[1]``; the body itself -> ``body``."""
    parts = [p for p in loc if p != "body"] if len(loc) > 1 else list(loc)
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def validation_body(errors: Sequence[Dict[str, Any]], fields: Sequence[str]) -> Dict[str, Any]:
    """The 422 body of pydantic ``errors``: one ``field: problem`` per error in ``message``
    (an unknown field lists the known ones), and ``detail`` with ``field``, ``msg``, ``type``."""
    detail, lines = [], []
    for e in errors:
        name = _field(e.get("loc", ()))
        msg = str(e.get("msg", "invalid"))
        if e.get("type") == "extra_forbidden":
            msg = f"unknown field (the fields are {', '.join(fields)})"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        detail.append({"field": name, "msg": msg, "type": e.get("type")})
        lines.append(f"{name}: {msg}")
    return {"error": "invalid request", "message": "; ".join(lines) or "invalid request", "detail": detail}


def create_app(predictor: Any, source: str = "") -> FastAPIOffline:
    """The app serving ``predictor`` (one with a corpus: an index or the demo corpus); ``source``
    names what it searches (logged and given by ``/health``)."""
    corpus = predictor.corpus
    if corpus is None or predictor.engine is None:
        raise ValueError("the service needs a predictor with a corpus (an index or the demo corpus)")
    lock = threading.Lock()
    fields = list(SearchRequest.model_fields)
    app = FastAPIOffline(title="lavis-c2f search", version=__version__,
                         description="Coarse-to-fine video corpus moment retrieval: stage 1 retrieves videos, "
                                     "stage 2 grounds moments in them, the scores are fused (optional stage 3 "
                                     f"refines). Searching: {source or corpus.kind}.")
    app.state.predictor = predictor

    def guarded(what: str, fn: Callable[[], T]) -> T:
        """``fn()`` under the engine lock (the predictor's searches first catch up with other
        processes' writes: :meth:`C2FPredictor.refresh`); an unreachable store propagates (503),
        any other exception is logged with a request id and becomes :class:`InternalError` (500
        without traceback)."""
        try:
            with lock:
                return fn()
        except IndexUnavailableError:
            raise
        except Exception:
            rid = uuid.uuid4().hex[:12]
            logger.exception("%s failed (request id %s)", what, rid)
            raise InternalError(rid) from None

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(validation_body(exc.errors(), fields), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not found", 405: "method not allowed"}.get(exc.status_code, "error")
        return JSONResponse({"error": kind, "message": str(exc.detail)}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(InternalError)
    async def _internal(request: Request, exc: InternalError) -> JSONResponse:
        return JSONResponse({"error": "internal server error", "request_id": exc.request_id,
                             "message": f"the server failed to answer; its log has the details (request id "
                                        f"{exc.request_id})"}, status_code=500)

    @app.exception_handler(IndexUnavailableError)
    async def _store_down(request: Request, exc: IndexUnavailableError) -> JSONResponse:
        logger.warning("%s %s: %s", request.method, request.url.path, exc)
        return JSONResponse({"error": "index store unavailable", "message": str(exc)}, status_code=503,
                            headers=_RETRY_AFTER)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:   # outside guarded(): a bug here
        rid = uuid.uuid4().hex[:12]
        logger.error("%s %s failed (request id %s)", request.method, request.url.path, rid, exc_info=exc)
        return await _internal(request, InternalError(rid))

    @app.get("/", include_in_schema=False)
    def _root() -> RedirectResponse:
        return RedirectResponse("/docs")

    @app.get("/health", response_model=HealthOut, responses={503: {"model": HealthOut}},
             summary="whether the service and its index store are up, and what it searches")
    def health() -> Any:
        out = {"status": "ok", "corpus": source or corpus.kind, "mode": predictor.mode,
               "mode_description": predictor.describe_mode(), "version": __version__}
        try:
            predictor.refresh()  # not under the engine lock: a health probe does not wait for a search
        except IndexUnavailableError as e:
            return JSONResponse({**out, "status": "store unavailable", "videos": corpus.vids_seen(), "message": str(e)},
                                status_code=503, headers=_RETRY_AFTER)
        return {**out, "videos": len(corpus.vids)}

    @app.post("/search", response_model=SearchResponse, responses=_ERRORS,
              summary="moments of one query or a list of queries, best first")
    def search(req: SearchRequest) -> Dict[str, Any]:
        if req.refine and predictor.mode["stage3"] == "off":
            raise RequestValidationError([{"loc": ("body", "refine"), "type": "value_error",
                                           "msg": "stage 3 is not configured on this server (start it with "
                                                  "--refine --refiner-cfg YAML)"}])
        queries = req.queries
        if not req.ground:
            t0 = time.perf_counter()
            ranked = guarded("POST /search (stage 1)", lambda: predictor.stage1_batch(queries, req.top_k))
            timings = {"total_s": round(time.perf_counter() - t0, 4)}
            mode = {**predictor.mode, "stage2": "off", "stage3": "off"}
            results: List[Dict[str, Any]] = [
                {"query": " ".join(q.split()), "mode": mode, "stage1": [[v, float(s)] for v, s in r], "moments": [],
                 "timings": timings} for q, r in zip(queries, ranked)]
        else:
            found = guarded("POST /search", lambda: predictor.search_batch(
                queries, top_k=req.top_k, stage1_top_k=req.stage1_top_k, refine=req.refine))
            results = [r.to_dict() for r in found]
        return {"results": results}

    @app.get("/videos/{vid}", response_model=VideoOut, responses={404: {"model": ErrorOut}},
             summary="what the service knows of an indexed video")
    def video(vid: str) -> Dict[str, Any]:
        if vid not in corpus:
            raise StarletteHTTPException(404, f"video {vid!r} is not in the {corpus.kind}")

        def meta() -> Dict[str, Any]:
            predictor.refresh()
            return {"vid": vid, "duration": float(corpus.duration(vid)), "clip_length": float(corpus.clip_length),
                    "n_clips": corpus.n_clips(vid), "path": corpus.path(vid),
                    "n_captions": len(corpus.captions(vid) or [])}

        return guarded(f"GET /videos/{vid}", meta)

    return app


__all__ = ["InternalError", "create_app", "validation_body"]
