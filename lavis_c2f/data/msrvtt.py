"""MSR-VTT annotation files as T-MASS, X-Pool, CLIP4Clip and UCoFiA read them -> ``MomentRecord``.

Files (the CLIP4Clip release, also shipped under T-MASS's ``data/MSRVTT/``):

* ``MSRVTT_data.json``: ``{"videos": [{"video_id", "start time", "end time", ...}],
  "sentences": [{"caption", "video_id", "sen_id"}]}`` -- 20 captions for each of the
  10 000 videos;
* ``MSRVTT_train.9k.csv`` (or ``.7k``): one column ``video_id``, the training videos;
* ``MSRVTT_JSFUSION_test.csv``: columns ``key, vid_key, video_id, sentence``, the 1k-A test
  split (1 000 videos, one caption each; JSFusion's split, used by every CLIP-based method).

Records:

* **train** (:func:`read_msrvtt_train`): every caption of every training video, videos in
  the order of the csv (first appearance) and, per video, captions in ``MSRVTT_data.json``
  order, as T-MASS's ``MSRVTTDataset._construct_all_train_pairs`` builds its pairs
  (9k: 9 000 videos x 20 = 180 000 pairs). ``qid`` = ``sen_id``.
* **test** (:func:`read_msrvtt_test`): one record per csv row in file order, ``qid`` = the
  row's ``key`` (``ret0``, ...).

``duration`` is ``end time - start time`` of ``MSRVTT_data.json`` when that file is given
and lists the video, else 0.0 (unknown; retrieval does not use it). ``relevant_windows`` are
empty (whole-video retrieval). Bad input raises one
:class:`~lavis_c2f.common.errors.DataFormatError` naming the file, line and field.
"""
from __future__ import annotations

import csv
import json
import os
from typing import Any, Dict, List, Optional, Tuple, Union

from lavis_c2f.common.errors import DataFormatError
from lavis_c2f.data.readers import ReadReport, RecordList
from lavis_c2f.data.records import MomentRecord

PathLike = Union[str, "os.PathLike[str]"]
TEST_COLUMNS = ("key", "vid_key", "video_id", "sentence")


def _require_file(path: str) -> None:
    if not os.path.isfile(path):
        raise DataFormatError("file not found", path=path)


class MSRVTTCaptions:
    """``MSRVTT_data.json``: captions and durations per video.

    Attributes:
        captions: vid -> [(sen_id, caption), ...] in file order.
        durations: vid -> seconds (``end time - start time``) for the listed videos.
    """

    def __init__(self, path: PathLike):
        self.path = os.fspath(path)
        _require_file(self.path)
        try:
            with open(self.path, "r", encoding="utf-8") as f:
                db = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataFormatError(f"not valid JSON: {e}", path=self.path) from None
        if not isinstance(db, dict) or not isinstance(db.get("sentences"), list):
            raise DataFormatError("expected an object with a 'sentences' list (MSRVTT_data.json)", path=self.path)
        self.captions: Dict[str, List[Tuple[Any, str]]] = {}
        seen = set()
        for i, s in enumerate(db["sentences"]):
            where = f"sentences[{i}]"
            if not isinstance(s, dict):
                raise DataFormatError(f"expected an object, got {type(s).__name__}", path=self.path, field=where)
            for key in ("caption", "video_id", "sen_id"):
                if key not in s:
                    raise DataFormatError("missing", path=self.path, field=f"{where}.{key}")
            cap, vid, sid = s["caption"], s["video_id"], s["sen_id"]
            if not isinstance(cap, str) or not cap.strip():
                raise DataFormatError(f"empty or non-string caption {cap!r}", path=self.path, field=f"{where}.caption")
            if not isinstance(vid, str) or not vid:
                raise DataFormatError(f"expected a video id string, got {vid!r}", path=self.path,
                                      field=f"{where}.video_id")
            if sid in seen:
                raise DataFormatError(f"duplicate sen_id {sid!r}", path=self.path, field=f"{where}.sen_id")
            seen.add(sid)
            self.captions.setdefault(vid, []).append((sid, cap))
        self.durations: Dict[str, float] = {}
        for i, v in enumerate(db.get("videos") or []):
            if isinstance(v, dict) and "video_id" in v and "start time" in v and "end time" in v:
                try:
                    self.durations[str(v["video_id"])] = float(v["end time"]) - float(v["start time"])
                except (TypeError, ValueError):
                    raise DataFormatError(f"non-numeric start/end time {v['start time']!r}/{v['end time']!r}",
                                          path=self.path, field=f"videos[{i}]") from None


def _read_csv(path: str, columns: Tuple[str, ...]) -> List[Tuple[int, Dict[str, str]]]:
    """(line number, row) of a csv with a header containing ``columns``."""
    _require_file(path)
    with open(path, "r", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in columns if c not in header]
        if missing:
            raise DataFormatError(f"missing column(s) {missing} in the header {header}", path=path, line=1)
        rows = []
        for row in reader:
            line = reader.line_num
            if None in row or any(row.get(c) is None for c in columns):
                raise DataFormatError(f"expected {len(header)} columns", path=path, line=line)
            rows.append((line, row))
    return rows


def read_msrvtt_video_list(path: PathLike) -> List[str]:
    """Video ids of a split csv with a ``video_id`` column (``MSRVTT_train.9k.csv``), in first
    appearance order (repeats dropped, as ``pandas.unique``)."""
    path = os.fspath(path)
    vids: List[str] = []
    seen = set()
    for line, row in _read_csv(path, ("video_id",)):
        vid = row["video_id"].strip()
        if not vid:
            raise DataFormatError("empty video id", path=path, line=line, field="video_id")
        if vid not in seen:
            seen.add(vid)
            vids.append(vid)
    return vids


def read_msrvtt_train(split_csv: PathLike, data_json: Union[PathLike, MSRVTTCaptions]) -> RecordList:
    """Training pairs of a split csv (module docstring). A video of the csv without captions
    in ``data_json`` is an error naming its csv line."""
    split_csv = os.fspath(split_csv)
    caps = data_json if isinstance(data_json, MSRVTTCaptions) else MSRVTTCaptions(data_json)
    report = ReadReport(path=split_csv)
    records: List[MomentRecord] = []
    lines = {row["video_id"].strip(): line for line, row in _read_csv(split_csv, ("video_id",))}
    for vid in read_msrvtt_video_list(split_csv):
        if vid not in caps.captions:
            raise DataFormatError(f"video {vid!r} has no caption in {caps.path}", path=split_csv,
                                  line=lines.get(vid), field="video_id")
        for sid, cap in caps.captions[vid]:
            records.append(MomentRecord(qid=sid, query=cap, vid=vid, duration=caps.durations.get(vid, 0.0),
                                        source=f"{caps.path}:sen_id={sid}"))
            report.n_read += 1
    return RecordList(records, report)


def read_msrvtt_test(path: PathLike, data_json: Optional[Union[PathLike, MSRVTTCaptions]] = None) -> RecordList:
    """The 1k-A test csv (``key, vid_key, video_id, sentence``), one record per row, in order;
    ``data_json`` only supplies durations."""
    path = os.fspath(path)
    caps = None if data_json is None else (data_json if isinstance(data_json, MSRVTTCaptions)
                                           else MSRVTTCaptions(data_json))
    report = ReadReport(path=path)
    records: List[MomentRecord] = []
    keys = set()
    for line, row in _read_csv(path, TEST_COLUMNS):
        key, vid, sent = row["key"].strip(), row["video_id"].strip(), row["sentence"]
        if not key:
            raise DataFormatError("empty key", path=path, line=line, field="key")
        if key in keys:
            raise DataFormatError(f"duplicate key {key!r}", path=path, line=line, field="key")
        if not vid:
            raise DataFormatError("empty video id", path=path, line=line, field="video_id")
        if not sent.strip():
            raise DataFormatError("empty sentence", path=path, line=line, field="sentence")
        keys.add(key)
        dur = caps.durations.get(vid, 0.0) if caps is not None else 0.0
        records.append(MomentRecord(qid=key, query=sent, vid=vid, duration=dur, source=f"{path}:{line}",
                                    extra={"vid_key": row["vid_key"].strip()}))
        report.n_read += 1
    return RecordList(records, report)
