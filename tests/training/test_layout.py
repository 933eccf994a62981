"""How each distributed strategy splits a step (training/layout.py), without processes: which
micro-batches and which slice of the sequence a process takes, the gradient scale, and the errors."""

from __future__ import annotations

import pytest
import torch

from mambakit.training.data import Batch
from mambakit.training.distributed import DistInfo
from mambakit.training.layout import layout, split_sequence


def _info(rank: int, world: int) -> DistInfo:
    return DistInfo(rank=rank, world_size=world, mesh=object())  # a stand-in mesh: "enabled"


def test_data_parallel_strategies_share_micro_batches_and_undo_the_average():
    for strategy in ("ddp", "fsdp"):
        lay = layout(strategy, _info(1, 4), 16)
        assert (lay.data_rank, lay.data_world, lay.seq_world, lay.grad_scale) == (1, 4, 1, 4.0)
        assert lay.loss_replicas == 1


def test_tp_takes_every_micro_batch_whole_and_holds_the_whole_loss():
    lay = layout("tp", _info(1, 2), 16)
    assert (lay.data_rank, lay.data_world, lay.seq_world, lay.grad_scale) == (0, 1, 1, 1.0)
    assert lay.loss_replicas == 2  # both processes hold the whole loss


def test_fsdp_tp_shares_micro_batches_between_tp_groups_of_consecutive_ranks():
    lays = [layout("fsdp_tp", _info(r, 6), 16, tp_size=3) for r in range(6)]
    assert [lay.data_rank for lay in lays] == [0, 0, 0, 1, 1, 1]
    assert all(
        (lay.data_world, lay.tp_size, lay.loss_replicas, lay.grad_scale) == (2, 3, 3, 2.0) for lay in lays
    )


def test_cp_takes_its_slice_of_the_sequence():
    ids = torch.arange(2 * 12).reshape(2, 12)
    batch = Batch(ids, ids + 100, ids // 5)
    parts = [split_sequence(batch, layout("cp", _info(r, 3), 12)) for r in range(3)]
    assert all(p.input_ids.shape == (2, 4) for p in parts)
    for field in ("input_ids", "targets", "seq_idx"):
        assert torch.equal(torch.cat([getattr(p, field) for p in parts], dim=1), getattr(batch, field))
    lay = layout("cp", _info(2, 3), 12)
    assert (lay.data_world, lay.seq_rank, lay.seq_world, lay.grad_scale) == (1, 2, 3, 1.0)
    assert lay.loss_replicas == 1  # the slices' sums add up


def test_one_process_is_the_plain_case_for_every_strategy():
    for strategy in ("ddp", "fsdp", "tp", "cp", "fsdp_tp"):
        lay = layout(strategy, DistInfo(), 10)
        assert (lay.data_world, lay.seq_world) == (1, 1)
        batch = Batch(torch.zeros(1, 10, dtype=torch.long), torch.zeros(1, 10, dtype=torch.long), None)
        assert split_sequence(batch, lay) is batch


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="distributed.strategy"):
        layout("pp", _info(0, 2), 16)
    with pytest.raises(ValueError, match="data.seq_len=10"):
        layout("cp", _info(0, 4), 10)
    for tp_size in (1, 3, 4):  # too small, not a divisor, one group only
        with pytest.raises(ValueError, match=f"distributed.tp_size={tp_size}"):
            layout("fsdp_tp", _info(0, 4), 16, tp_size=tp_size)
