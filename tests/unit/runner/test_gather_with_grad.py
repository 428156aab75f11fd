"""``common.dist.all_gather_with_grad`` in a 2-process gloo group: the gathered tensor is every
rank's rows in rank order, and each rank's gradient is the slice of its own rows (the official
CLIP4Clip / UCoFiA ``AllGather``): with a loss computed identically on every rank from the
gathered rows, that slice is the full-batch gradient of those rows."""
import multiprocessing as mp
import socket

import torch
import torch.distributed as dist

from lavis_c2f.common.dist import all_gather_with_grad


def _rank(rank: int, port: int, out) -> None:
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
        full = torch.arange(12, dtype=torch.float64).view(4, 3) / 7
        weights = torch.arange(1, 5, dtype=torch.float64)[:, None]
        x = full[2 * rank: 2 * rank + 2].clone().requires_grad_(True)
        y = all_gather_with_grad(x)
        (y.sin() * weights).sum().backward()
        ref = full.clone().requires_grad_(True)
        (ref.sin() * weights).sum().backward()
        out.put((rank, torch.equal(y.detach(), full), torch.allclose(x.grad, ref.grad[2 * rank: 2 * rank + 2])))
        dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001 - reported to the parent
        out.put((rank, repr(e), None))


def test_two_ranks():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert results == [(0, True, True), (1, True, True)]
    one = torch.ones(2)
    assert all_gather_with_grad(one) is one                          # one process: the tensor itself
