"""Text output of ``lavis-c2f search``: clock times and the aligned result table (pure python)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from lavis_c2f.common.clock import format_time


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> str:
    """Fixed-width table: a header line, a rule and one line per row. ``align`` gives one
    character per column (``l`` or ``r``; default: left for the first text columns, right for
    numbers)."""
    cells = [[str(c) for c in r] for r in rows]
    ncol = len(headers)
    if any(len(r) != ncol for r in cells):
        raise ValueError("every row needs one cell per header")
    widths = [max([len(headers[j])] + [len(r[j]) for r in cells]) for j in range(ncol)]
    if not align:
        align = "".join("r" if cells and all(_numeric(r[j]) for r in cells) else "l" for j in range(ncol))

    def line(vals: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if a == "r" else v.ljust(w) for v, w, a in zip(vals, widths, align)).rstrip()

    out = [line(list(headers)), "  ".join("-" * w for w in widths)]
    out.extend(line(r) for r in cells)
    return "\n".join(out)


def _numeric(s: str) -> bool:
    try:
        float(s.replace(":", ""))
        return True
    except ValueError:
        return False


def moments_table(moments: Sequence[Mapping[str, Any]]) -> str:
    """The table of ``lavis-c2f search``: rank, video, start, end, score, stage-1 and stage-2
    scores (moments as :meth:`lavis_c2f.predictor.Moment.to_dict` rows)."""
    rows = []
    for m in moments:
        s1 = m.get("stage1_score")
        s2 = m.get("stage2_score")
        rows.append([m["rank"], m["vid"], format_time(m["start"]), format_time(m["end"]), f"{m['score']:.3f}",
                     "-" if s1 is None else f"{s1:.3f}", "-" if s2 is None else f"{s2:.3f}"])
    return format_table(["rank", "video", "start", "end", "score", "stage1", "stage2"], rows, align="rlrrrrr")


__all__ = ["format_table", "format_time", "moments_table"]
