"""Request and response bodies of the HTTP search service (pydantic models: validation and the
OpenAPI schema).

Limits (``max_top_k``, ``max_stage1_top_k``, ``max_queries``, ``max_query_chars``) come from
``lavis_c2f/configs/pipeline/serve.yaml``; the defaults of a search (``top_k``,
``stage1_top_k``) from ``configs/pipeline/search.yaml``, as for ``lavis-c2f search``. Unknown
fields are refused (``extra="forbid"``), so a misspelt option is an error, not ignored.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lavis_c2f.data.cfg import yaml_defaults
from lavis_c2f.pipeline.engine import SEARCH_DEFAULTS

#: limits of a request and the server's host / port defaults: lavis_c2f/configs/pipeline/serve.yaml
SERVE_DEFAULTS = yaml_defaults("pipeline/serve.yaml", "serve")


class SearchRequest(BaseModel):
    """``POST /search``: one query or a list of queries, searched in one run of the engine."""

    model_config = ConfigDict(extra="forbid")

    query: Union[str, List[str]] = Field(
        description="the query text, or a list of queries (answered in order)",
        examples=["a man opens the fridge", ["a man opens the fridge", "a dog runs on the beach"]])
    top_k: int = Field(SEARCH_DEFAULTS["top_k"], ge=1, le=SERVE_DEFAULTS["max_top_k"],
                       description="moments returned per query (videos with ground=false)")
    stage1_top_k: Optional[int] = Field(None, ge=1, le=SERVE_DEFAULTS["max_stage1_top_k"],
                                        description="videos grounded per query (default: the server's "
                                                    "--stage1-top-k)")
    ground: bool = Field(True, description="false: stage 1 only, the top_k best videos and no moments")
    refine: Optional[bool] = Field(None, description="run stage 3 (needs a server started with --refine); "
                                                     "default: when the server has a refiner")

    @field_validator("query", mode="before")
    @classmethod
    def _check_query(cls, v: Any) -> Any:
        items = v if isinstance(v, list) else [v]
        if isinstance(v, list) and not 1 <= len(v) <= SERVE_DEFAULTS["max_queries"]:
            raise ValueError(f"give 1 to {SERVE_DEFAULTS['max_queries']} queries, got {len(v)}")
        for i, q in enumerate(items):
            at = f" (item {i})" if isinstance(v, list) else ""
            if not isinstance(q, str):
                raise ValueError(f"a query is a string{at}, got {type(q).__name__}")
            if not q.strip():
                raise ValueError(f"the query is empty{at}")
            if len(q) > SERVE_DEFAULTS["max_query_chars"]:
                raise ValueError(f"the query is longer than {SERVE_DEFAULTS['max_query_chars']} characters{at}")
        return v

    @property
    def queries(self) -> List[str]:
        return self.query if isinstance(self.query, list) else [self.query]


class MomentOut(BaseModel):
    """One moment: ``vid``, ``start`` / ``end`` seconds, fused ``score`` and the stage scores."""

    rank: int
    vid: str
    start: float
    end: float
    start_hms: str
    end_hms: str
    score: float
    stage1_score: Optional[float] = None
    stage2_score: Optional[float] = None
    duration: Optional[float] = None
    path: Optional[str] = None
    refined: bool = False


class QueryResultOut(BaseModel):
    """The answer to one query: the fused ``moments`` (best first, empty with ground=false),
    the stage-1 list ``[[vid, score], ...]``, the mode of each stage and the timings (seconds,
    of the whole request's batch)."""

    query: str
    mode: Dict[str, str]
    stage1: List[List[Union[str, float]]]
    moments: List[MomentOut]
    timings: Dict[str, float]


class SearchResponse(BaseModel):
    results: List[QueryResultOut] = Field(description="one result per query, in the order of the request")


class VideoOut(BaseModel):
    """``GET /videos/{vid}``: what the service knows of an indexed video."""

    vid: str
    duration: float = Field(description="seconds")
    clip_length: float = Field(description="seconds per feature clip")
    n_clips: Optional[int] = None
    path: Optional[str] = Field(None, description="the video file (None for the demo corpus)")
    n_captions: int = Field(0, description="speech / subtitle captions known for it")


class HealthOut(BaseModel):
    """``GET /health``: ``status`` ``ok`` (200), or ``store unavailable`` (503: the index store,
    a Milvus server, does not answer; ``message`` says which and why, ``videos`` is the last
    count seen)."""

    status: str
    videos: int
    corpus: str
    mode: Dict[str, str]
    mode_description: str
    version: str
    message: Optional[str] = None


class ErrorOut(BaseModel):
    """Every error answer: ``error`` (its kind) and ``message`` (one line; for 422 it names the
    field, ``detail`` lists each problem)."""

    error: str
    message: str
    detail: Optional[List[Dict[str, Any]]] = None
    request_id: Optional[str] = None


__all__ = ["ErrorOut", "HealthOut", "MomentOut", "QueryResultOut", "SERVE_DEFAULTS", "SearchRequest",
           "SearchResponse", "VideoOut"]
