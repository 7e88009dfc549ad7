"""What nnalign adds to nnU-Net's DDP, run with 2 gloo processes on the CPU: gradients of parameters outside the
DDP-wrapped network are averaged over the ranks, and per-step logs are gathered from every rank."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch


def _step_on_rank(rank: int, world_size: int, init_file: str, result_file: str) -> None:
    from torch import distributed as dist

    from nnalign.training.common import gathered_over_ranks, optimizer_step

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)  # the same initial weights on every rank
        synchronised, head = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
        unused = torch.nn.Parameter(torch.ones(2))  # no gradient on rank 0, gradient 4 on rank 1
        params = [*synchronised.parameters(), *head.parameters(), unused]
        optimizer = torch.optim.SGD(params, lr=0.1)
        x = torch.full((1, 3), float(rank + 1))  # different data on each rank
        loss = synchronised(x).sum() + head(x).sum() + (4 * unused.sum() if rank == 1 else 0)
        optimizer_step(loss, optimizer, None, params, [*head.parameters(), unused])
        logs = gathered_over_ranks([float(rank), 10.0 + rank])
        Path(f"{result_file}.{rank}").write_text(json.dumps({
            "synchronised": synchronised.weight.detach().flatten().tolist(),
            "head": head.weight.detach().flatten().tolist(), "head_bias": head.bias.item(),
            "unused": unused.detach().tolist(), "logs": logs.tolist()}))
        dist.barrier()  # no rank tears gloo down while another still talks to it (else SIGABRT at exit, 2 of 8 runs)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_unsynchronised_gradients_are_averaged_and_logs_gathered_over_ranks(tmp_path):
    import torch.multiprocessing as mp

    result = tmp_path / "result"
    mp.spawn(_step_on_rank, args=(2, str(tmp_path / "rendezvous"), str(result)), nprocs=2, join=True)
    ranks = [json.loads(Path(f"{result}.{r}").read_text()) for r in range(2)]
    torch.manual_seed(0)
    start = torch.nn.Linear(3, 1).weight.detach().flatten()
    head_start = torch.nn.Linear(3, 1)
    # the head: gradient x = 1 on rank 0 and 2 on rank 1, averaged to 1.5 (bias: 1 on both); lr 0.1
    for r in ranks:
        assert r["head"] == pytest.approx((head_start.weight.detach().flatten() - 0.15).tolist(), abs=1e-6)
        assert r["head_bias"] == pytest.approx(head_start.bias.item() - 0.1, abs=1e-6)
        assert r["unused"] == pytest.approx([0.8, 0.8])  # gradient (0 + 4) / 2
        assert r["logs"] == [0.0, 10.0, 1.0, 11.0]  # rank 0's steps, then rank 1's
    # the plain network is left to DDP (not wrapped here): each rank steps on its own gradient
    assert ranks[0]["synchronised"] == pytest.approx((start - 0.1).tolist(), abs=1e-6)
    assert ranks[1]["synchronised"] == pytest.approx((start - 0.2).tolist(), abs=1e-6)


def test_without_a_process_group_nothing_is_averaged_or_gathered():
    from nnalign.training.common import average_gradients_over_ranks, gathered_over_ranks

    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([1.0, 2.0])
    average_gradients_over_ranks([p])
    assert p.grad.tolist() == [1.0, 2.0]
    assert gathered_over_ranks([1, 2]).tolist() == [1.0, 2.0] and gathered_over_ranks([1]).dtype == np.float64
