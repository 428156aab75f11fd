"""Device and distributed helpers that work on CPU (gloo) and GPU (nccl).

LAVIS 1.0.2's ``init_distributed_mode`` hard-codes nccl and ``torch.cuda.set_device``;
these replacements pick the backend from the device, and every collective here is a
no-op in a single process.
"""
from __future__ import annotations

import datetime
import logging
import os
import random
from typing import Any, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from lavis_c2f.common.errors import ConfigError

logger = logging.getLogger(__name__)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    """``dist.barrier()`` when a process group exists, else nothing."""
    if is_dist():
        dist.barrier()


def resolve_device(requested: Optional[str] = None, *, fallback: bool = True) -> torch.device:
    """``requested`` ('cuda', 'cuda:1', 'cpu' or None/'auto') -> a usable device.

    With ``fallback`` (training/evaluation YAML), 'cuda' without a GPU falls back to CPU with a
    warning, so one YAML serves both; without it (the predictor, the CLI's ``--device``), an
    explicit 'cuda' request on a machine without one raises :class:`ConfigError`.
    Under ``torch.distributed.run`` on GPUs, each rank gets ``cuda:LOCAL_RANK``.
    """
    req = str(requested or "auto").lower()
    if req in ("auto", "cuda") or req.startswith("cuda"):
        if torch.cuda.is_available():
            if req in ("auto", "cuda") and "LOCAL_RANK" in os.environ:
                return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            return torch.device("cuda" if req == "auto" else req)
        if req != "auto":
            if not fallback:
                raise ConfigError(f"device '{requested}' requested but CUDA is not available on this machine "
                                  "(use 'cpu' or 'auto')")
            logger.warning("device '%s' requested but CUDA is not available; using CPU", requested)
        return torch.device("cpu")
    try:
        return torch.device(req)
    except RuntimeError as e:
        raise ConfigError(f"unknown device '{requested}' (expected 'auto', 'cpu', 'cuda' or 'cuda:N')") from e


def init_distributed(device: torch.device, timeout_s: int = 1800) -> bool:
    """Start the process group when launched by ``torch.distributed.run``.

    Backend: nccl on CUDA devices, gloo on CPU. Returns True when distributed.
    """
    if is_dist():
        return True
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    if int(os.environ["WORLD_SIZE"]) < 1:
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, init_method="env://",
                            timeout=datetime.timedelta(seconds=timeout_s))
    logger.info("distributed: rank %d / %d, backend %s", get_rank(), get_world_size(), backend)
    return True


def all_gather_objects(obj: Any) -> List[Any]:
    """Gather a picklable object from every rank (a one-element list in one process)."""
    if not is_dist():
        return [obj]
    out: List[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send ``obj`` from rank ``src`` to every rank."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def init_from_env(device: Optional[str] = None, timeout_s: int = 1800) -> torch.device:
    """The device of this process (:func:`resolve_device`, ``cuda:LOCAL_RANK`` under
    ``torch.distributed.run`` on GPUs) with the process group started when the launcher's
    environment asks for one (``WORLD_SIZE`` > 1): the commands that split their work by rank
    (``lavis-c2f extract``, ``lavis-c2f index videos``) call it first."""
    dev = resolve_device(device, fallback=False)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        init_distributed(dev, timeout_s=timeout_s)
    return dev


def rank_items(items: Sequence[Any], rank: Optional[int] = None, world: Optional[int] = None) -> List[Any]:
    """This rank's share of ``items``: every ``world``-th item from position ``rank``
    (round robin, so ranks get similar mixes of a sorted list); all of them in one process."""
    rank = get_rank() if rank is None else int(rank)
    world = get_world_size() if world is None else int(world)
    return list(items[rank::world])


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    seed = int(seed) % (2**31)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; the backward returns this rank's slice of the incoming gradient
    (no reduction over ranks), as the ``AllGather`` of CLIP4Clip/UCoFiA."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows, ctx.rank = x.shape[0], get_rank()
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``x`` (B, ...) of every rank concatenated in rank order (W B, ...); gradients flow back
    to this rank's rows only. Every rank must pass the same B. ``x`` itself in one process."""
    if not is_dist() or get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)
