"""Filling one Milvus collection from several processes (``torch.distributed.run``), resumably.

    python -m torch.distributed.run --nproc_per_node N -m lavis_c2f.cli index build \\
        --backend milvus --out http://HOST:19530#videos --features ... --model-cfg ...

1. **Open** (:func:`open_for_ranks`): rank 0 creates the collection and its manifest (or resumes
   it, or drops it first with ``--overwrite``); the other ranks wait for it (a broadcast), then
   open it. One writer of the schema and the manifest, so ranks never race to create them. A
   failure on rank 0 is raised on every rank (no rank waits for a collection that never comes).
2. **Upsert** (:func:`upsert_rank_batches`): the video list is cut into the batches a
   one-process build encodes (``batch_size``); rank ``r`` of ``w`` takes batches ``r, r + w,
   ...`` (:func:`lavis_c2f.common.dist.rank_items`), skips those whose videos are all stored
   already (a resumed run), encodes the others and upserts them by video id. Same batches, same
   rows: the collection equals a one-process build's, whatever the process count; a re-run
   after a crash (a rank killed mid-way) adds nothing twice (upserts replace rows by id) and
   encodes only the batches not finished.
3. **Close**: each rank flushes its writes, the ranks meet at a barrier, and rank 0 alone
   writes what needs the whole corpus (Sinkhorn biases, the sidecar, the counts in the manifest).

Embedded milvus-lite (``corpus.db``) opens its data folder in one process only
(``DataDirLockedError``), so several ranks need a server: ``milvus-lite server --data-dir D
--port P`` (then ``--out http://127.0.0.1:P#COLLECTION``) or Milvus standalone / distributed
(:func:`check_ranks_can_share`). A skipped batch is not re-encoded even if its features changed
since: ``index add --replace`` re-encodes given videos, ``--overwrite`` rebuilds.
"""
from __future__ import annotations

import hashlib
import logging
from typing import Any, Callable, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from lavis_c2f.common import dist as c2f_dist
from lavis_c2f.common.errors import ConfigError
from lavis_c2f.common.progress import progress_bar
from lavis_c2f.index.milvus_index import MilvusIndex, MilvusLocator

logger = logging.getLogger(__name__)


def check_ranks_can_share(loc: MilvusLocator, world: int) -> None:
    """:class:`ConfigError` when ``world`` > 1 processes would open an embedded milvus-lite file."""
    if world > 1 and loc.embedded:
        raise ConfigError(f"--out {loc}: an embedded milvus-lite file is opened by one process at a time, so "
                          f"{world} ranks cannot fill it; start a server on its data folder ('milvus-lite server "
                          "--data-dir DIR --port 19530') and pass --out http://127.0.0.1:19530#"
                          f"{loc.collection} (or a Milvus standalone / distributed URI), or run one process")


def _on_rank0(fn: Callable[[], Any], loc: Any, what: str, share: bool) -> Any:
    """Run ``fn()`` on rank 0 only. An error there is raised on rank 0 and, as a
    ``RuntimeError`` naming rank 0, ``what`` and ``loc``, on every other rank (none waits for a
    result that never comes). Returns ``fn()``'s result on rank 0 and, with ``share``, its
    broadcast on the others (else None there)."""
    out: Any = None
    if c2f_dist.get_rank() == 0:
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - re-raised here; the others are told before they wait
            c2f_dist.broadcast_object((None, f"{type(e).__name__}: {e}"))
            raise
    shared, failure = c2f_dist.broadcast_object((out if share else None, None))
    if failure is not None:
        raise RuntimeError(f"rank 0 could not {what} {loc}: {failure}")
    return out if c2f_dist.get_rank() == 0 else shared


def open_for_ranks(loc: MilvusLocator, model, create: Callable[[], MilvusIndex], timeout: float) -> MilvusIndex:
    """Rank 0 runs ``create()`` (create, resume or overwrite the collection); then every other
    rank opens it. An error on rank 0 is raised on every rank, naming rank 0."""
    index = _on_rank0(create, loc, "create or open", share=False)
    return index if index is not None else MilvusIndex.open(loc, model=model, timeout=timeout)


def rank_batches(vids: Sequence[str], batch_size: int) -> List[List[str]]:
    """This rank's share of the one-process batches of ``vids``: batches ``rank, rank + world, ...``."""
    if int(batch_size) < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    batches = [list(vids[s:s + batch_size]) for s in range(0, len(vids), batch_size)]
    return [batches[b] for b in c2f_dist.rank_items(range(len(batches)))]


def upsert_rank_batches(index: MilvusIndex, vids: Sequence[str], load: Callable[[str], np.ndarray],
                        durations: Optional[Mapping[str, Optional[float]]] = None,
                        sources: Optional[Mapping[str, Optional[str]]] = None, batch_size: int = 64,
                        progress: bool = True) -> Tuple[int, int]:
    """Encode and upsert this rank's batches of ``vids`` (:func:`rank_batches`) that are not
    stored yet, then flush; returns (videos encoded, videos skipped as already stored)."""
    vids = [str(v) for v in vids]
    digest = hashlib.sha256("\n".join(vids).encode()).hexdigest()
    if len(set(c2f_dist.all_gather_objects(digest))) > 1:
        raise ConfigError("the ranks see different video lists (check that every node reads the same --features, "
                          "--ann, --shard and --limit)")
    mine = rank_batches(vids, batch_size)
    stored = index.present([v for b in mine for v in b])
    todo = [b for b in mine if not set(b) <= stored]
    skipped = sum(len(b) for b in mine) - sum(len(b) for b in todo)
    if skipped:
        logger.info("index: rank %d skips %d videos already stored (%d batches)", c2f_dist.get_rank(), skipped,
                    len(mine) - len(todo))
    it: Iterable[List[str]] = todo
    if progress:
        it = progress_bar(todo, desc=f"index: encode videos rank {c2f_dist.get_rank()}/{c2f_dist.get_world_size()}",
                          unit="batch", leave=True)
    for b in it:      # one call per batch: the batches of a one-process build, whatever the rank
        index.add_features(b, load, durations, batch_size=len(b), progress=False, sources=sources)
    index.flush()
    return sum(len(b) for b in todo), skipped


def finish_ranks(index: MilvusIndex, after: Optional[Callable[[MilvusIndex], Any]] = None) -> Any:
    """Barrier; then rank 0 runs ``after(index)`` (biases, sidecar) and saves the manifest; its
    result (or its error, raised on every rank) is broadcast to all ranks."""
    c2f_dist.barrier()

    def finish() -> Any:
        out = after(index) if after is not None else None
        index.save()
        return out

    return _on_rank0(finish, index.locator, "finish", share=True)


__all__ = ["check_ranks_can_share", "finish_ranks", "open_for_ranks", "rank_batches", "upsert_rank_batches"]
