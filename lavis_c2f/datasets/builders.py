"""LAVIS dataset builders: ``c2f_qvh``, ``c2f_charades_sta``, ``c2f_tacos``, ``c2f_demo``.

Each builder reads its dataset YAML (``lavis_c2f/configs/datasets/<ds>/defaults.yaml``, found
through :func:`lavis_c2f.paths.config_path`, so LAVIS's ``Config`` gets an absolute path) and
builds ``{split: dataset}`` straight from local files: LAVIS's download/copy logic is not used.

Dataset YAML schema (``datasets: {<name>: {...}}``; unknown keys raise ``ConfigError``)::

    type: default                  # LAVIS picks the YAML with it (only "default" exists)
    dataset_type: moment_retrieval # stage 2 (MomentRetrievalDataset) | video_retrieval (stage 1)
    data_root: DIR                 # base of the relative paths below; relative -> cwd
                                   # (null/"" -> cwd; c2f_demo: default_demo_root())
    annotations:                   # one entry per split to build
      train: {path: FILE, format: auto|qvh|charades_sta|tacos,
              durations: features|CSV|null,   # charades_sta: Charades_v1_*.csv, or from the
                                              # first video stream (num_clips * clip_length)
              qid_offset: 0, require_windows: false}
    reader: {tolerance: 1.0, clamp: false, swap_reversed: false, on_error: raise|skip,
             strip_video_ext: false}          # see lavis_c2f.data.readers
    video_features:                # list of streams, concatenated in order
      - {type: npz|hdf5|wds, path: P, field: features, key_format: "{key}.npz", cache_size: 0}
    text_features: {type: npz, path: P, field: last_hidden_state,
                    pooled_field: pooler_output, qid_format: "qid{qid}", key_format: ...}
    clip_length: 2.0               # seconds per feature row
    max_v_l: 75                    # clips kept (null: all)
    max_q_l: 32                    # tokens kept (null: all)
    max_windows: 5                 # GT windows used as span labels
    use_tef: true                  # append TEF columns (moment_retrieval only)
    normalize: true                # L2-normalise video streams and text
    seed: 0                        # label sampling (with epoch and index)
    saliency_max_n: 1              # QD-DETR max_n
    saliency_tie_break: official   # hard saliency labels among tied clips: official (numpy's
                                   # scalar introsort, as QD-DETR/MESM) | stable (lowest index)
    norm_style: qd_detr            # qd_detr: x / (||x|| + 1e-5); mesm: F.normalize (eps 1e-12
                                   # video, 1e-5 text), see lavis_c2f.data.features
    label_style: qd_detr           # qd_detr | mesm (MESM's saliency rule and clip_mask)
    group_by: null                 # null: one item per query; video | youtube: MESM's items
                                   # (all queries of a video / YouTube id per item)
    max_group_size: null           # MESM max_gather_size (null: whole groups)
    group_splits: [train]          # the splits built as grouped items
    splits: null                   # subset of annotation splits to build (null: all)
    # c2f_demo only:
    auto_generate: true            # generate the demo corpus at data_root if missing
    demo_params: {}                # DemoCorpusParams overrides for auto_generate

A file that does not exist raises ``ConfigError`` naming the file and its YAML key
(``datasets.c2f_qvh.annotations.val.path``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from lavis.common.registry import registry
from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder
from omegaconf import OmegaConf

from lavis_c2f.common.dist import barrier, is_main_process
from lavis_c2f.common.errors import ConfigError, DataFormatError
from lavis_c2f.data.cfg import check_keys, to_plain
from lavis_c2f.data.demo_corpus import DemoCorpusParams, default_demo_root, make_demo_corpus, read_corpus_meta
from lavis_c2f.data.features import NORM_STYLES, FeatureStore, open_store
from lavis_c2f.data.readers import DEFAULT_TOLERANCE, FORMATS, RecordList, detect_format, read_annotations
from lavis_c2f.datasets.moment_retrieval import (GROUP_BY, LABEL_STYLES, TIE_BREAKS,
                                                 GroupedMomentDataset, MomentRetrievalDataset)
from lavis_c2f.datasets.video_retrieval import VideoRetrievalDataset
from lavis_c2f.paths import resolve_path, table_config_path
from lavis_c2f.processors.feature_processors import TextFeatureProcessor, VideoFeatureProcessor

DATASET_TYPES = ("moment_retrieval", "video_retrieval")
SPLITS = ("train", "val", "test")
COMMON_KEYS = {"type", "dataset_type", "data_root", "annotations", "reader", "video_features",
               "text_features", "clip_length", "max_v_l", "max_q_l", "max_windows", "use_tef",
               "normalize", "seed", "saliency_max_n", "saliency_tie_break", "splits",
               "norm_style", "label_style", "group_by", "max_group_size", "group_splits"}
ANNOTATION_KEYS = {"path", "format", "durations", "qid_offset", "require_windows"}
READER_KEYS = {"tolerance", "clamp", "swap_reversed", "on_error", "strip_video_ext"}
STORE_KEYS = {"type", "path", "field", "key_format", "cache_size", "cache_index"}
TEXT_EXTRA_KEYS = {"pooled_field", "qid_format"}


@dataclass
class DatasetSpec:
    """A validated dataset config (paths absolute)."""

    name: str
    dataset_type: str
    data_root: str
    annotations: Dict[str, Dict[str, Any]]
    reader: Dict[str, Any]
    video_features: List[Dict[str, Any]]
    text_features: Dict[str, Any]
    pooled_field: str
    qid_format: str
    clip_length: float
    max_v_l: Optional[int]
    max_q_l: Optional[int]
    max_windows: int
    use_tef: bool
    normalize: bool
    seed: int
    saliency_max_n: int
    saliency_tie_break: str
    splits: List[str]
    extra: Dict[str, Any] = field(default_factory=dict)
    norm_style: str = "qd_detr"
    label_style: str = "qd_detr"
    group_by: Optional[str] = None
    max_group_size: Optional[int] = None
    group_splits: List[str] = field(default_factory=lambda: ["train"])


def _opt_int(d: Dict[str, Any], key: str, where: str, default: Optional[int], minimum: int = 1) -> Optional[int]:
    v = d.get(key, default)
    if v is None or (isinstance(v, int) and not isinstance(v, bool) and v < 0 and key in ("max_v_l", "max_q_l")):
        return None  # null or -1 (lighthouse style) = no limit
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"{where}.{key}: expected an integer >= {minimum}, got {v!r}")
    return v


def _bool(d: Dict[str, Any], key: str, where: str, default: bool) -> bool:
    v = d.get(key, default)
    if not isinstance(v, bool):
        raise ConfigError(f"{where}.{key}: expected true/false, got {v!r}")
    return v


def parse_dataset_config(cfg: Any, name: str, extra_keys: Optional[set] = None,
                         default_root: Optional[str] = None) -> DatasetSpec:
    """Validate a dataset config (one ``datasets.<name>`` node) into a :class:`DatasetSpec`.

    Relative ``data_root`` resolves against the cwd; other relative paths against
    ``data_root``. ``default_root`` replaces an empty ``data_root``.
    """
    where = f"datasets.{name}"
    d = check_keys(cfg, COMMON_KEYS | set(extra_keys or ()), where)
    extra = {k: d[k] for k in (extra_keys or ()) if k in d}
    dataset_type = d.get("dataset_type", "moment_retrieval")
    if dataset_type not in DATASET_TYPES:
        raise ConfigError(f"{where}.dataset_type: expected one of {DATASET_TYPES}, got {dataset_type!r}")
    root_val = d.get("data_root")
    if root_val in (None, "", "null"):
        root_val = default_root
    data_root = resolve_path(root_val) if root_val not in (None, "") else os.getcwd()

    anns = d.get("annotations")
    if not isinstance(anns, dict) or not anns:
        raise ConfigError(f"{where}.annotations: expected a mapping split -> {{path, format}}, got {anns!r}")
    annotations: Dict[str, Dict[str, Any]] = {}
    for split, a in anns.items():
        aw = f"{where}.annotations.{split}"
        if split not in SPLITS:
            raise ConfigError(f"{aw}: unknown split {split!r}; expected one of {SPLITS}")
        if isinstance(a, str):
            a = {"path": a}
        a = check_keys(a, ANNOTATION_KEYS, aw)
        if not a.get("path"):
            raise ConfigError(f"{aw}.path: missing")
        fmt = a.get("format", "auto")
        if fmt != "auto" and fmt not in FORMATS:
            raise ConfigError(f"{aw}.format: expected 'auto' or one of {FORMATS}, got {fmt!r}")
        dur = a.get("durations")
        if isinstance(dur, str) and dur != "features":
            dur = resolve_path(dur, data_root)
        annotations[split] = {"path": resolve_path(a["path"], data_root), "format": fmt, "durations": dur,
                              "qid_offset": int(a.get("qid_offset", 0)),
                              "require_windows": bool(a.get("require_windows", False))}

    reader = check_keys(d.get("reader"), READER_KEYS, f"{where}.reader")
    reader.setdefault("tolerance", DEFAULT_TOLERANCE)
    if reader.get("on_error", "raise") not in ("raise", "skip"):
        raise ConfigError(f"{where}.reader.on_error: expected 'raise' or 'skip', got {reader['on_error']!r}")

    vf = d.get("video_features")
    if isinstance(vf, (str, dict)):
        vf = [vf]
    if not isinstance(vf, list) or not vf:
        raise ConfigError(f"{where}.video_features: expected a non-empty list of store specs, got {vf!r}")
    video_features = []
    for i, s in enumerate(vf):
        s = {"path": s} if isinstance(s, str) else s
        s = check_keys(s, STORE_KEYS, f"{where}.video_features[{i}]")
        if not s.get("path"):
            raise ConfigError(f"{where}.video_features[{i}].path: missing")
        s["path"] = resolve_path(s["path"], data_root)
        video_features.append(s)

    tf = d.get("text_features")
    tf = {"path": tf} if isinstance(tf, str) else tf
    tf = check_keys(tf, STORE_KEYS | TEXT_EXTRA_KEYS, f"{where}.text_features")
    if not tf.get("path"):
        raise ConfigError(f"{where}.text_features.path: missing")
    tf["path"] = resolve_path(tf["path"], data_root)
    pooled_field = tf.pop("pooled_field", "pooler_output")
    qid_format = tf.pop("qid_format", "qid{qid}")
    if "{qid}" not in str(qid_format):
        raise ConfigError(f"{where}.text_features.qid_format: must contain '{{qid}}', got {qid_format!r}")
    tf.setdefault("field", "last_hidden_state")

    clip_length = d.get("clip_length")
    if isinstance(clip_length, bool) or not isinstance(clip_length, (int, float)) or clip_length <= 0:
        raise ConfigError(f"{where}.clip_length: expected a positive number of seconds, got {clip_length!r}")
    splits = d.get("splits") or list(annotations)
    for s in splits:
        if s not in annotations:
            raise ConfigError(f"{where}.splits: {s!r} has no entry in {where}.annotations "
                              f"({sorted(annotations)})")
    seed = d.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"{where}.seed: expected an integer, got {seed!r}")
    tie_break = d.get("saliency_tie_break", "official")
    if tie_break not in TIE_BREAKS:
        raise ConfigError(f"{where}.saliency_tie_break: expected one of {list(TIE_BREAKS)}, got {tie_break!r}")
    choices = {"norm_style": NORM_STYLES, "label_style": LABEL_STYLES, "group_by": (None,) + GROUP_BY}
    for key, allowed in choices.items():
        if d.get(key, allowed[0]) not in allowed:
            raise ConfigError(f"{where}.{key}: expected one of {list(allowed)}, got {d.get(key)!r}")
    max_group = d.get("max_group_size")
    if max_group is not None and (isinstance(max_group, bool) or not isinstance(max_group, int)):
        raise ConfigError(f"{where}.max_group_size: expected an integer or null, got {max_group!r}")
    group_splits = d.get("group_splits", ["train"])
    if not isinstance(group_splits, (list, tuple)) or not all(isinstance(x, str) for x in group_splits):
        raise ConfigError(f"{where}.group_splits: expected a list of split names, got {group_splits!r}")
    return DatasetSpec(
        name=name, dataset_type=dataset_type, data_root=data_root, annotations=annotations,
        reader=reader, video_features=video_features, text_features=tf, pooled_field=pooled_field,
        qid_format=str(qid_format), clip_length=float(clip_length),
        max_v_l=_opt_int(d, "max_v_l", where, 75), max_q_l=_opt_int(d, "max_q_l", where, 32),
        max_windows=_opt_int(d, "max_windows", where, 5), use_tef=_bool(d, "use_tef", where, True),
        normalize=_bool(d, "normalize", where, True), seed=seed,
        saliency_max_n=_opt_int(d, "saliency_max_n", where, 1), saliency_tie_break=tie_break,
        splits=list(splits), extra=extra,
        norm_style=d.get("norm_style", "qd_detr"), label_style=d.get("label_style", "qd_detr"),
        group_by=d.get("group_by"),
        max_group_size=None if max_group is None or max_group < 0 else max_group,
        group_splits=list(group_splits))


def load_dataset_yaml(path: str) -> Any:
    """The single ``datasets.<name>`` node of a dataset YAML (ConfigError naming the file)."""
    if not os.path.isfile(path):
        raise ConfigError(f"dataset config {path} not found")
    root = OmegaConf.load(path)
    ds = root.get("datasets") if hasattr(root, "get") else None
    if ds is None or len(ds) != 1:
        raise ConfigError(f"{path}: expected 'datasets:' with exactly one dataset entry")
    return ds[list(ds.keys())[0]]


class C2FBuilderBase(BaseDatasetBuilder):
    """LAVIS builder plumbing shared by the c2f builders: the default dataset YAML, reading the
    config node (None -> the default YAML, a YAML path, or the ``datasets.<name>`` node LAVIS
    passes) and ``build``. Subclasses parse the node and implement ``build_datasets``."""

    DATASET_CONFIG_DICT: Dict[str, str] = {}
    NAME = ""

    @classmethod
    def default_config_path(cls, type: str = "default") -> str:  # noqa: A002 - LAVIS signature
        return table_config_path(cls.NAME, cls.DATASET_CONFIG_DICT, type)

    @classmethod
    def read_config(cls, cfg: Any) -> Any:
        """The ``datasets.<name>`` node for ``cfg`` (None: the default YAML; a path: that YAML)."""
        if cfg is None:
            return load_dataset_yaml(cls.default_config_path())
        if isinstance(cfg, (str, os.PathLike)):
            return load_dataset_yaml(str(cfg))
        return cfg

    def build_processors(self) -> None:  # processors come from the dataset keys, not vis_processor:
        pass

    def build(self) -> Dict[str, Any]:
        return self.build_datasets()


class C2FFeatureDatasetBuilder(C2FBuilderBase):
    """Base of the c2f builders: pre-extracted features + annotations -> datasets.

    ``builder = Builder(cfg)`` with ``cfg`` None (the default YAML), a YAML path, or the
    ``datasets.<name>`` node LAVIS passes; ``builder.build_datasets()`` -> ``{split: dataset}``.
    """

    DATASET_CONFIG_DICT = {"default": "datasets/qvh/defaults.yaml"}
    NAME = "c2f_qvh"
    EXTRA_KEYS: set = set()

    def __init__(self, cfg: Any = None):  # noqa: D401 - LAVIS signature
        # BaseDatasetBuilder.__init__ expects LAVIS's build_info/data_type: not called on purpose.
        cfg = self.read_config(cfg)
        self.config = cfg
        self.data_type = "features"
        self.spec = parse_dataset_config(cfg, self.NAME, self.EXTRA_KEYS, self._default_root())
        vp = VideoFeatureProcessor(normalize=self.spec.normalize, max_len=self.spec.max_v_l,
                                   use_tef=self.spec.use_tef and self.spec.dataset_type == "moment_retrieval",
                                   norm_style=self.spec.norm_style)
        tp = TextFeatureProcessor(normalize=self.spec.normalize, max_len=self.spec.max_q_l,
                                  norm_style=self.spec.norm_style)
        self.vis_processors = {"train": vp, "eval": vp}
        self.text_processors = {"train": tp, "eval": tp}

    # -- hooks
    def _default_root(self) -> Optional[str]:
        return None

    def _prepare(self) -> None:
        """Called before building (the demo builder generates its corpus here)."""

    # -- building
    def _open_store(self, spec: Dict[str, Any], key: str) -> FeatureStore:
        if not os.path.exists(spec["path"]) and not any(c in spec["path"] for c in "*?{["):
            raise ConfigError(f"{key}: feature store not found: {spec['path']}")
        try:
            return open_store(spec)
        except DataFormatError as e:
            raise ConfigError(f"{key}: {e}") from None

    def open_stores(self):
        """``(video stores, text store)`` as configured."""
        where = f"datasets.{self.NAME}"
        video = [self._open_store(s, f"{where}.video_features[{i}].path")
                 for i, s in enumerate(self.spec.video_features)]
        text = self._open_store(self.spec.text_features, f"{where}.text_features.path")
        return video, text

    def read_split(self, split: str, video_stores: Optional[List[FeatureStore]] = None) -> RecordList:
        """Records of ``split`` (ConfigError naming the YAML key when the file is missing)."""
        where = f"datasets.{self.NAME}.annotations.{split}"
        a = self.spec.annotations[split]
        if not os.path.isfile(a["path"]):
            raise ConfigError(f"{where}.path: annotation file not found: {a['path']}")
        fmt = a["format"]
        if fmt == "auto":
            fmt = detect_format(a["path"])
        opts = dict(self.spec.reader)
        kw: Dict[str, Any] = {k: opts[k] for k in ("tolerance", "clamp", "swap_reversed", "on_error") if k in opts}
        if fmt == "qvh":
            kw["require_windows"] = a["require_windows"]
        if fmt == "tacos":
            kw["strip_video_ext"] = bool(opts.get("strip_video_ext", False))
            kw["qid_offset"] = a["qid_offset"]
        if fmt == "charades_sta":
            kw["qid_offset"] = a["qid_offset"]
            dur = a["durations"]
            if dur is None:
                raise ConfigError(f"{where}.durations: charades_sta needs durations: 'features' or a "
                                  "Charades_v1_*.csv path")
            if dur == "features":
                stores = video_stores if video_stores is not None else self.open_stores()[0]
                kw["durations"], kw["clip_length"] = stores[0], self.spec.clip_length
            elif isinstance(dur, str):
                if not os.path.isfile(dur):
                    raise ConfigError(f"{where}.durations: file not found: {dur}")
                kw["durations"] = dur
            else:
                kw["durations"] = dur
        return read_annotations(a["path"], fmt=fmt, **kw)

    def build_datasets(self) -> Dict[str, Any]:
        """``{split: MomentRetrievalDataset | VideoRetrievalDataset}`` (no download step)."""
        self._prepare()
        video_stores, text_store = self.open_stores()
        out: Dict[str, Any] = {}
        for split in self.spec.splits:
            records = self.read_split(split, video_stores)
            proc_key = "train" if split == "train" else "eval"
            name = f"{self.NAME}/{split}"
            if self.spec.dataset_type == "moment_retrieval":
                out[split] = MomentRetrievalDataset(
                    records, video_stores, text_store, vis_processor=self.vis_processors[proc_key],
                    text_processor=self.text_processors[proc_key], clip_length=self.spec.clip_length,
                    text_field=self.spec.text_features["field"], qid_format=self.spec.qid_format,
                    max_windows=self.spec.max_windows, seed=self.spec.seed,
                    saliency_max_n=self.spec.saliency_max_n,
                    saliency_tie_break=self.spec.saliency_tie_break,
                    label_style=self.spec.label_style, name=name)
                if self.spec.group_by is not None and split in self.spec.group_splits:
                    out[split] = GroupedMomentDataset(out[split], self.spec.group_by,
                                                      self.spec.max_group_size, self.spec.seed)
            else:
                out[split] = VideoRetrievalDataset(
                    records, video_stores, text_store, vis_processor=self.vis_processors[proc_key],
                    text_processor=self.text_processors[proc_key],
                    text_field=self.spec.text_features["field"], pooled_field=self.spec.pooled_field,
                    qid_format=self.spec.qid_format, name=name)
            out[split].clip_length = self.spec.clip_length
        return out


@registry.register_builder("c2f_qvh")
class QVHighlightsBuilder(C2FFeatureDatasetBuilder):
    """QVHighlights (Moment-DETR features)."""

    DATASET_CONFIG_DICT = {"default": "datasets/qvh/defaults.yaml"}
    NAME = "c2f_qvh"


@registry.register_builder("c2f_charades_sta")
class CharadesSTABuilder(C2FFeatureDatasetBuilder):
    """Charades-STA (txt annotations; qid = 0-based line index)."""

    DATASET_CONFIG_DICT = {"default": "datasets/charades_sta/defaults.yaml"}
    NAME = "c2f_charades_sta"


@registry.register_builder("c2f_tacos")
class TACoSBuilder(C2FFeatureDatasetBuilder):
    """TACoS (2D-TAN json split)."""

    DATASET_CONFIG_DICT = {"default": "datasets/tacos/defaults.yaml"}
    NAME = "c2f_tacos"


@registry.register_builder("c2f_demo")
class DemoCorpusBuilder(C2FFeatureDatasetBuilder):
    """The embedded demo corpus (``lavis_c2f.data.demo_corpus``), generated on first use."""

    DATASET_CONFIG_DICT = {"default": "datasets/demo/defaults.yaml"}
    NAME = "c2f_demo"
    EXTRA_KEYS = {"auto_generate", "demo_params"}

    def _default_root(self) -> Optional[str]:
        return default_demo_root()

    def _prepare(self) -> None:
        auto = self.spec.extra.get("auto_generate", True)
        if not isinstance(auto, bool):
            raise ConfigError(f"datasets.{self.NAME}.auto_generate: expected true/false, got {auto!r}")
        overrides = to_plain(self.spec.extra.get("demo_params")) or {}
        if not isinstance(overrides, dict):
            raise ConfigError(f"datasets.{self.NAME}.demo_params: expected a mapping, got {overrides!r}")
        try:
            params = DemoCorpusParams.from_dict({**DemoCorpusParams().to_dict(), **overrides})
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"datasets.{self.NAME}.demo_params: {e}") from None
        root = self.spec.data_root
        meta = read_corpus_meta(root)
        if meta is not None:
            # an existing corpus is used as is, unless demo_params ask for something else
            if overrides and meta.get("params") != params.to_dict():
                raise ConfigError(f"datasets.{self.NAME}.demo_params: the corpus at {root} was made with "
                                  "other parameters; point data_root elsewhere or regenerate it with "
                                  "`lavis-c2f make-demo-corpus --force`")
            return
        if not auto:
            raise ConfigError(f"datasets.{self.NAME}.data_root: no demo corpus at {root} (run `lavis-c2f "
                              "make-demo-corpus` or set auto_generate: true)")
        if is_main_process():
            make_demo_corpus(root, params)
        barrier()
