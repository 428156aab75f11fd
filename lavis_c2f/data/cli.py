"""``lavis-c2f make-demo-corpus`` and ``lavis-c2f convert`` (registered by lavis_c2f/cli.py)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List, Optional

from lavis_c2f.common.errors import ConfigError
from lavis_c2f.data.demo_corpus import DemoCorpusExistsError, DemoCorpusParams, make_demo_corpus
from lavis_c2f.data.features import convert_store


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_param_overrides(pairs: Optional[List[str]], option: str = "--param") -> Dict[str, Any]:
    """``KEY=VALUE`` strings (VALUE as JSON, else the string) -> a dict of demo corpus parameters."""
    out: Dict[str, Any] = {}
    for p in pairs or []:
        if "=" not in p:
            raise ConfigError(f"{option} expects KEY=VALUE, got {p!r}")
        k, v = p.split("=", 1)
        out[k.strip()] = _parse_value(v.strip())
    return out


def cmd_make_demo_corpus(args: argparse.Namespace) -> int:
    overrides = parse_param_overrides(args.param)
    for name in ("seed", "n_videos", "video_dim", "text_dim"):
        v = getattr(args, name)
        if v is not None:
            overrides[name] = v
    try:
        params = DemoCorpusParams.from_dict({**DemoCorpusParams().to_dict(), **overrides})
    except TypeError as e:
        raise ConfigError(f"demo corpus parameters: {e}") from None
    try:
        meta = make_demo_corpus(args.out, params, force=args.force)
    except DemoCorpusExistsError as e:
        print(f"lavis-c2f make-demo-corpus: error: {e}", file=sys.stderr)
        return 1
    splits = ", ".join(f"{s} {len(meta['splits'][s]['vids'])} videos / {meta['splits'][s]['n_queries']} queries"
                       for s in ("train", "val", "test"))
    if meta["generated"]:
        print(f"demo corpus written to {meta['path']} in {meta['seconds']:.1f} s: {splits}; "
              f"{meta['content']['n_files']} files, {meta['content']['n_bytes'] / 1e6:.1f} MB")
    else:
        print(f"demo corpus already complete at {meta['path']} (same parameters): {splits}")
    return 0


def _store_spec(text: str, type_: Optional[str], field: Optional[str], key_format: Optional[str],
                maxcount: Optional[int]) -> Any:
    text = text.strip()

    try:
        spec: Dict[str, Any] = json.loads(text) if text.startswith("{") else {"path": text}
    except ValueError as e:
        raise ConfigError(f"store spec {text!r} is not valid JSON: {e}") from None
    if type_:
        spec["type"] = type_
    if field:
        spec["field"] = field
    if key_format:
        spec["key_format"] = key_format
    if maxcount is not None:
        spec["maxcount"] = maxcount
    return spec


def cmd_convert(args: argparse.Namespace) -> int:
    src = _store_spec(args.src, args.src_type, args.field, args.src_key_format, None)
    dst = _store_spec(args.dst, args.dst_type, None, args.dst_key_format, args.maxcount)
    if set(dst) == {"path"}:
        dst = dst["path"]  # typed by convert_store: .h5/.hdf5 -> hdf5, else an npz folder
    elif "type" not in dst:
        p = str(dst["path"]).lower()
        dst["type"] = "hdf5" if p.endswith((".h5", ".hdf5", ".hdf")) else "npz"
    try:
        store = convert_store(src, dst, overwrite=args.overwrite, progress=not args.no_progress)
    except FileExistsError as e:
        print(f"lavis-c2f convert: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {len(store)} keys to {store.type_name} store {store.path}")
    store.close()
    return 0


def register(subparsers: "argparse._SubParsersAction") -> None:
    p = subparsers.add_parser(
        "make-demo-corpus", help="generate the seeded synthetic demo corpus (seconds, no download)",
        description="Generate the embedded demo corpus (Moment-DETR layout) into OUT. A rerun with "
                    "the same parameters is a no-op; other parameters need --force.")
    p.add_argument("out", metavar="OUT", help="output folder")
    p.add_argument("--force", action="store_true", help="replace OUT if it holds something else")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--n-videos", dest="n_videos", type=int, default=None)
    p.add_argument("--video-dim", dest="video_dim", type=int, default=None)
    p.add_argument("--text-dim", dest="text_dim", type=int, default=None)
    p.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="any DemoCorpusParams field, VALUE as JSON (e.g. video_noise=0.8, "
                        "queries_per_video=[2,4]); repeatable")
    p.set_defaults(func=cmd_make_demo_corpus)

    c = subparsers.add_parser(
        "convert", help="copy a feature store between npz folders, HDF5 and webdataset shards",
        description="Convert a feature store. SRC/DST are paths or JSON specs such as "
                    '\'{"type": "wds", "path": "out_dir", "maxcount": 500}\'. Output is written to a '
                    "temporary name and renamed into place.")
    c.add_argument("--src", required=True, help="source store: path or JSON spec")
    c.add_argument("--dst", required=True, help="destination: path or JSON spec")
    c.add_argument("--src-type", choices=["npz", "hdf5", "wds"], default=None)
    c.add_argument("--dst-type", choices=["npz", "hdf5", "wds"], default=None,
                   help="default: hdf5 for a .h5/.hdf5 path, else an npz folder (wds: a folder of "
                        "shard-NNNNNN.tar)")
    c.add_argument("--field", default=None, help="default field of the source store")
    c.add_argument("--src-key-format", default=None, help='npz source file naming, e.g. "{key}.npy"')
    c.add_argument("--dst-key-format", default=None, help='npz destination file naming')
    c.add_argument("--maxcount", type=int, default=None, help="samples per shard (wds destination)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_convert)
