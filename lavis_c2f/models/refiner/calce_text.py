"""CALCE's text rules, reproduced exactly (pure Python; no torch, no tokenizer objects kept).

Everything here is what the official CALCE code (tjhd1475/CALCE, a LAVIS fork built on Mr. BLIP)
does to text around the model, pinned down by ``../shared/fixtures/calce_reference``:

* **Subtitles** (:func:`parse_calce_srt`, :func:`calce_subtitles`): the ``.srt`` is read line by
  line (a digits-only line starts an entry, a ``-->`` line sets ``start``/``end`` in seconds,
  other lines are joined with one space). Consecutive entries whose start equals the running
  end and whose text equals the first entry's are merged. ``subtitle_durations`` chains the raw
  entries (before any text filter) while ``start <= running end + 2.5`` s. The text filter
  (:func:`calce_text_filter`) works on the lower-cased text without punctuation
  (``re.sub(r"[^\\w\\s]", "")``): fewer than 80 % ``[a-zA-Z]+`` words drops the entry, then the
  filler words ``the a o oh yeah uh ah yep uh-no hmm`` are removed and an empty entry is dropped.
  A file starting with a UTF-8 BOM is read without it (the official reader would take the first
  number line for text); a malformed time raises :class:`DataFormatError` naming file and line.
* **Numbers** (:func:`find_annoying_numbers`, :func:`annoying_replacement`, :func:`calce_int`):
  an "annoying" number in ``range(200)`` tokenises to more than one T5 piece without a leading
  ``▁``; it is replaced by the closest non-annoying number (``+j`` tried before ``-j``). Times in
  the prompt are ``int(round(t))`` (half to even) after that replacement.
* **Prompt text** (:func:`calce_text_prompt`)::

      "Query: " + query + "\\n" [+ "ref: " + str(coarse_windows) + "\\n"] + "Items: " + ",".join(items)
      + "\\n" + "Given the video and the subtitle and the query, find the query relevant windows.\\n"
      + "Relevant windows: "

* **Target** (:func:`calce_target_text`): ``str(windows)`` with every annoying number replaced by
  plain ``str.replace`` in table order (substrings too: ``"1120"`` changes with ``112``).
* **Answer parsing** (:func:`calce_post_process`, :func:`moment_str_to_list`): ``\\d+`` integers
  only (signs and decimals are lost), at most two numbers per window, reversed pairs swapped,
  lone numbers paired, ``start < 0 -> 0``, ``end > duration`` repaired (the digits of the duration
  removed, else ``% 100`` for 4 digits, ``% 1000`` for 6, else ``duration``), sorted by start;
  a text that is not ``[[...]...]`` gives ``[[0, duration]]`` (``[[-1, -1]]`` without duration).
"""
from __future__ import annotations

import ast
import os
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from lavis_c2f.common.errors import DataFormatError

TASK_PROMPT = ("Given the video and the subtitle and the query, find the query relevant windows.\n"
               "Relevant windows: ")
FILTER_WORDS = ("the", "a", "o", "oh", "yeah", "uh", "ah", "yep", "uh-no", "hmm")
TALK_KEYWORDS = ("talk", "speak", "say", "describe", "explain", "chat", "shout", "scream")
SUBTITLE_CHAIN_GAP_S = 2.5
NO_SUBTITLE = {"start": -1, "end": -1, "text": "*None*"}

Subtitle = Dict[str, Any]  # {"start": float s, "end": float s, "text": str}
_ENGLISH = re.compile(r"^[a-zA-Z]+$")
_TIME = re.compile(r"^(\d+):(\d{1,2}):(\d{1,2})[,.](\d{1,6})$")


# =========================================================================== subtitles
def _srt_seconds(stamp: str, path: str, line: int) -> float:
    """``HH:MM:SS,fff`` -> seconds, computed as the official ``datetime`` route does."""
    m = _TIME.match(stamp.strip())
    if m is None:
        raise DataFormatError(f"bad subtitle time {stamp!r} (expected HH:MM:SS,mmm)", path=path, line=line)
    h, mi, s = int(m.group(1)), int(m.group(2)), int(m.group(3))
    us = int(m.group(4).ljust(6, "0"))
    return h * 3600 + mi * 60 + s + us / 1_000_000


def parse_calce_srt(text: str, path: str = "<srt>") -> List[Subtitle]:
    """The raw ``{start, end, text}`` entries of an ``.srt`` text, as CALCE's reader makes them
    (entries without text are skipped). A text line before any time line is an error."""
    entries: List[Subtitle] = []
    cur: Dict[str, Any] = {}
    cur_line = 0

    def add() -> None:
        if "text" in cur:
            if "start" not in cur:
                raise DataFormatError("subtitle text without a 'start --> end' line", path=path, line=cur_line)
            entries.append(dict(cur))
        cur.clear()

    if text.startswith("\ufeff"):
        text = text[1:]
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line.isdigit():
            add()
            cur_line = lineno
        elif "-->" in line:
            parts = line.split(" --> ")
            if len(parts) != 2:
                raise DataFormatError(f"bad time line {line!r} (expected 'start --> end')", path=path, line=lineno)
            cur["start"] = _srt_seconds(parts[0], path, lineno)
            cur["end"] = _srt_seconds(parts[1], path, lineno)
            cur_line = cur_line or lineno
        elif line:
            cur["text"] = cur["text"] + " " + line if "text" in cur else line
            cur_line = cur_line or lineno
    add()
    return entries


def merge_calce_subtitles(entries: Sequence[Subtitle]) -> List[Subtitle]:
    """Merge runs of entries that touch (``start == running end``) and repeat the first text."""
    out: List[Subtitle] = []
    i = 0
    while i < len(entries):
        j = i + 1
        now_end = entries[i]["end"]
        while j < len(entries) and entries[j]["start"] == now_end and entries[j]["text"] == entries[i]["text"]:
            now_end = entries[j]["end"]
            j += 1
        out.append({"start": entries[i]["start"], "text": entries[i]["text"], "end": entries[j - 1]["end"]})
        i = j
    return out


def subtitle_durations(entries: Sequence[Subtitle], gap: float = SUBTITLE_CHAIN_GAP_S) -> List[List[float]]:
    """Spans ``[start, end]`` of chains of raw entries with ``start <= running end + gap``."""
    out: List[List[float]] = []
    i = 0
    while i < len(entries):
        j = i + 1
        now_end = entries[i]["end"]
        while j < len(entries) and entries[j]["start"] <= now_end + gap:
            now_end = entries[j]["end"]
            j += 1
        out.append([entries[i]["start"], entries[j - 1]["end"]])
        i = j
    return out


def calce_text_filter(text: str, min_english: float = 0.8,
                      filter_words: Sequence[str] = FILTER_WORDS) -> Optional[str]:
    """The cleaned subtitle text, or None when CALCE drops it (module doc)."""
    words = re.sub(r"[^\w\s]", "", text).lower().split()
    english = [w for w in words if _ENGLISH.match(w)]
    if len(english) < len(words) * min_english:
        return None
    kept = [w for w in words if w not in filter_words]
    return " ".join(kept) if kept else None


def calce_subtitles(srt_text: Optional[str], path: str = "<srt>") -> Tuple[List[Subtitle], List[List[float]]]:
    """``(subtitles, subtitle_durations)`` of an ``.srt`` text as CALCE's datasets make them:
    merged and filtered entries (cleaned text), and the durations of the raw entries.
    ``None`` or ``""`` (no speech) gives ``([], [])``."""
    if not srt_text:
        return [], []
    entries = parse_calce_srt(srt_text, path)
    merged = merge_calce_subtitles(entries)
    subs = []
    for s in merged:
        clean = calce_text_filter(s["text"])
        if clean is not None:
            subs.append({"start": s["start"], "text": clean, "end": s["end"]})
    return subs, subtitle_durations(entries)


def read_srt_text(path: Optional[str]) -> Optional[str]:
    """The text of an ``.srt`` file (UTF-8), or None for a path that is None or missing
    (a video without speech)."""
    if not path or not os.path.isfile(path):
        return None
    with open(path, "r", encoding="utf-8") as f:
        return f.read()


def is_talk_relative(query_prompt: str, keywords: Sequence[str] = TALK_KEYWORDS) -> bool:
    """CALCE's talk test: a keyword occurs as a substring of the ``"Query: ...\\n"`` string."""
    return any(k in query_prompt for k in keywords)


# =========================================================================== numbers
def find_annoying_numbers(tokenize: Callable[[str], List[int]], range_end: int = 200,
                          space_id: int = 3) -> List[int]:
    """Numbers in ``range(range_end)`` that ``tokenize`` (no special tokens) splits into several
    pieces, the first of which is not the lone ``▁`` (``space_id``)."""
    out = []
    for i in range(range_end):
        ids = tokenize(str(i))
        if len(ids) > 1 and ids[0] != space_id:
            out.append(i)
    return out


def annoying_replacement(annoying: Sequence[int]) -> Dict[int, int]:
    """``{n: closest non-annoying number}`` (``n + j`` is tried before ``n - j``)."""
    bad = set(annoying)
    table: Dict[int, int] = {}
    for i in annoying:
        for j in range(100):
            if i + j not in bad:
                table[i] = i + j
                break
            if i - j not in bad:
                table[i] = i - j
                break
    return table


def calce_int(t: float, table: Mapping[int, int]) -> int:
    """A time as CALCE writes it: ``round(t)`` (half to even), replaced when annoying."""
    r = round(t)
    return int(table.get(r, r))


# =========================================================================== prompt and target
def calce_text_prompt(query: str, items: Optional[Sequence[str]],
                      coarse_windows: Optional[Sequence[Any]] = None) -> str:
    """The text part of the T5 input (module doc); ``coarse_windows`` only in stage 2; ``items``
    None leaves out the ``Items:`` line (a stage-1 model trained without items)."""
    ref = "" if coarse_windows is None else "ref: " + str(coarse_windows) + "\n"
    item_line = "" if items is None else "Items: " + ",".join(items) + "\n"
    return "Query: " + query + "\n" + ref + item_line + TASK_PROMPT


def calce_target_text(windows: Any, table: Mapping[int, int]) -> str:
    """The training answer: ``str(windows)`` (a string is used as is) with annoying numbers
    replaced by ``str.replace`` in table order."""
    text = windows if isinstance(windows, str) else str(windows)
    for a, b in table.items():
        text = text.replace(str(a), str(b))
    return text


def calce_windows(windows: Sequence[Sequence[float]]) -> List[List[int]]:
    """Windows in seconds as CALCE's annotations hold them for training (integers, half to even,
    as its Charades preprocessing rounds them; QVHighlights windows are integers already)."""
    return [[int(round(float(w[0]))), int(round(float(w[1])))] for w in windows]


# =========================================================================== answers
def calce_post_process(pred: str, duration: Optional[float] = None) -> List[List[int]]:
    """CALCE's ``post_process``: the windows of a generated text (module doc)."""
    pred = pred.split("</s>")[0]
    if duration is not None and not isinstance(duration, int) and float(duration).is_integer():
        duration = int(duration)
    if not re.match(r"\[\[.*\],*\]", pred):
        return [[-1, -1]] if duration is None else [[0, duration]]
    windows = re.split(r"\s+(?=\[)", pred[1:-1])
    out: List[List[int]] = []

    def add(start: int, end: int) -> None:
        if start < 0:
            start = 0
        if duration is not None and end > duration:
            if str(duration) in str(end):
                end = int(str(end).replace(str(duration), ""))
            elif len(str(end)) == 4:
                end = end % 100
            elif len(str(end)) == 6:
                end = end % 1000
            else:
                end = duration
        out.append([min(start, end), max(start, end)])

    save: Optional[int] = None
    for window in windows:
        window = re.sub(r",+$", "", window)
        window = re.sub(r"(\d) (\d)", r"\1, \2", window)
        window = re.sub(r",+", ",", window)
        numbers = re.findall(r"\d+", window)
        if not numbers:
            continue
        numbers = numbers[:2]
        if len(numbers) == 1:
            if save is not None:
                add(min(save, int(numbers[0])), max(save, int(numbers[0])))
                save = None
            else:
                save = int(numbers[0])
            continue
        st, ed = int(numbers[0]), int(numbers[1])
        if st > ed:
            st, ed = ed, st
        add(st, ed)
        if save is not None and save < st:
            add(save, st - 1)
            save = None
    if save is not None and duration:
        add(save, duration)
    return sorted(out, key=lambda w: w[0])


def moment_str_to_list(m: str) -> List[List[Any]]:
    """CALCE's ``moment_str_to_list``: a literal ``[[a, b], ...]`` string (read up to ``</s>``,
    as the reference fixture records it) as a list; anything else is ``[[-1, -1]]``, and a
    sub-list without exactly two elements becomes ``[-1, -1]``."""
    m = m.split("</s>")[0]
    if m == "[[-1, -1]]" or not re.match(r"\[\[.*\]\]", m):
        return [[-1, -1]]
    try:
        out = ast.literal_eval(m)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return [[-1, -1]]
    if not isinstance(out, list):
        return [[-1, -1]]
    return [w if isinstance(w, (list, tuple)) and len(w) == 2 else [-1, -1] for w in out]
