"""The layout of a ``lavis-c2f quickstart`` run directory, written and read in this one place.

::

    RUN/corpus/             the demo corpus (corpus.json, annotations/, clip_features/)
    RUN/runs/<job>/         the runner's job folders (stage1, stage1_infer, stage2, c2f_test, ...)
    RUN/merged/             stage-2 annotations with the stage-1 results of each split
    RUN/fusion.json         the fusion weight tuned on val (``lavis-c2f tune-fusion``)
    RUN/progress.json       ``{"step", "steps", "name"}`` of the step running, rewritten at each step
    RUN/quickstart.log      the runner's logs
    RUN/table.txt           the printed table
    RUN/summary.json        written last: metrics, timings and ``"checkpoints": {"stage1", "stage2"}``

A run is *finished* when its ``summary.json`` names two checkpoint files that exist and
``corpus/corpus.json`` exists (what the predictor and the web demo need).
"""
from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

from lavis_c2f.common.io import write_json
from lavis_c2f.paths import resolve_path

PathLike = Union[str, "os.PathLike[str]"]
DEFAULT_ROOT = "c2f_quickstart"
STAGES = ("stage1", "stage2")


def _read_object(path: Path) -> Optional[Dict[str, Any]]:
    try:
        with open(path, "r", encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


class QuickstartRun:
    """One run directory (module docstring); ``path`` is made absolute."""

    def __init__(self, path: PathLike):
        self.path = Path(resolve_path(path))

    @classmethod
    def new(cls, out: Optional[PathLike] = None) -> "QuickstartRun":
        """``out``, or ``./c2f_quickstart/<timestamp>`` (the quickstart's default)."""
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        return cls(out or os.path.join(DEFAULT_ROOT, stamp))

    @classmethod
    def latest(cls, root: PathLike) -> Optional["QuickstartRun"]:
        """The most recent finished run directly under ``root`` (by the time its
        ``summary.json`` was written), or None."""
        if not os.path.isdir(root):
            return None
        best: Tuple[float, str] = (-1.0, "")
        for name in os.listdir(root):
            run = cls(os.path.join(root, name))
            if run.path.is_dir() and run.finished_checkpoints() is not None:
                best = max(best, (os.path.getmtime(run.summary), str(run.path)))
        return cls(best[1]) if best[1] else None

    # ------------------------------------------------------------------ paths
    corpus = property(lambda self: self.path / "corpus")
    runs = property(lambda self: self.path / "runs")
    merged = property(lambda self: self.path / "merged")
    fusion = property(lambda self: self.path / "fusion.json")
    progress_file = property(lambda self: self.path / "progress.json")
    log = property(lambda self: self.path / "quickstart.log")
    table = property(lambda self: self.path / "table.txt")
    summary = property(lambda self: self.path / "summary.json")

    def job(self, name: str) -> Path:
        """The runner's folder of job ``name`` (``run.output_dir=RUN/runs``, ``run.job_id=name``)."""
        return self.runs / name

    # ------------------------------------------------------------------ checkpoints
    def _summary_checkpoints(self) -> Dict[str, Any]:
        ck = (_read_object(self.summary) or {}).get("checkpoints")
        return ck if isinstance(ck, dict) else {}

    def checkpoints(self) -> Dict[str, Optional[str]]:
        """``{"stage1", "stage2"}``: the checkpoints ``summary.json`` names, else the jobs'
        ``checkpoint_best.pth`` (None when neither exists). A missing run directory, or a
        checkpoint named by the summary that is gone, raises ``FileNotFoundError``."""
        if not self.path.is_dir():
            raise FileNotFoundError(f"quickstart run directory not found: {self.path}")
        named = self._summary_checkpoints()
        out: Dict[str, Optional[str]] = {k: named.get(k) for k in STAGES}
        for key in STAGES:
            if not out[key]:
                cand = self.job(key) / "checkpoint_best.pth"
                out[key] = str(cand) if cand.is_file() else None
        for key, p in out.items():
            if p and not os.path.isfile(p):
                raise FileNotFoundError(f"{self.summary}: the {key} checkpoint {p} does not exist")
        return out

    def finished_checkpoints(self) -> Optional[Dict[str, str]]:
        """The two checkpoints of a finished run (module docstring), else None."""
        ck = self._summary_checkpoints()
        out = {k: ck.get(k) for k in STAGES}
        if not all(isinstance(p, str) and os.path.isfile(p) for p in out.values()):
            return None
        if not (self.corpus / "corpus.json").is_file():
            return None
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ progress
    def write_progress(self, step: int, steps: int, name: str) -> None:
        """Record the step now running (read by :meth:`progress`)."""
        write_json({"step": int(step), "steps": int(steps), "name": str(name)}, self.progress_file, indent=None)

    def progress(self) -> Optional[Tuple[int, int, str]]:
        """``(step, steps, name)`` of the step running (or the last one), None before the first."""
        p = _read_object(self.progress_file)
        try:
            step, steps, name = int(p["step"]), int(p["steps"]), str(p["name"])
        except (TypeError, KeyError, ValueError):
            return None
        return (step, steps, name) if 0 < step <= steps else None

    def __fspath__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"QuickstartRun({str(self.path)!r})"


__all__ = ["DEFAULT_ROOT", "QuickstartRun"]
