"""Run under torchrun with 4 processes (gloo, CPU): FSDP2 x TP on a ("dp" 2, "tp" 2) DeviceMesh for
Mamba-1, Mamba-2 and hybrid models against one process on the same weights and global batch: logits,
loss, gradients (gathered to full tensors) and 3 SGD steps. Then a checkpoint written from the 2-D
layout (own format) loads into TP over 4 ranks and into one process with the same logits. Last, CP x TP
on a ("cp" 2, "tp" 2) mesh: each TP pair holds one half of the sequence."""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from mambakit.models import LanguageModel
from mambakit.parallel.context_parallel_model import parallelize_context, sum_gradients
from mambakit.parallel.fsdp_tp import full_state_dict, parallelize_fsdp_tp, save_full
from mambakit.parallel.tensor_parallel import clip_grad_norm_, gather_full, parallelize_tensor
from tests.parallel.common import check_close, finish, setup
from tests.parallel.worker_models import SEQLEN, STEPS, _batch, _loss_sum, _optimizer, _reference, configs


def _full_grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}  # FSDP shards over "dp"
    return gather_full(grads, model.tp_plan, model.tp_group)


def fsdp_tp_case(name, config, mesh, ckpt_dir):
    dp_rank, dp = mesh.get_local_rank("dp"), mesh.size(0)
    ref = _reference(config)
    model = parallelize_fsdp_tp(copy.deepcopy(ref), mesh)
    opt_ref, opt = _optimizer(ref), _optimizer(model)
    rows = slice(dp_rank * 2 // dp, (dp_rank + 1) * 2 // dp)  # the batch's 2 rows split over "dp"
    for step in range(STEPS):
        ids, targets, seq_idx = _batch(step, config.vocab_size, 2)
        want = ref(ids, seq_idx=seq_idx)
        got = model(ids[rows], seq_idx=seq_idx[rows])
        check_close(f"FSDPxTP {name} step {step} logits", got, want[rows])
        loss_ref, loss = _loss_sum(want, targets), _loss_sum(got, targets[rows])
        total = loss.detach().clone()
        dist.all_reduce(total, group=mesh.get_group("dp"))
        check_close(f"FSDPxTP {name} step {step} loss", total, loss_ref.detach())
        loss_ref.backward()
        (loss * dp).backward()  # FSDP2 averages over "dp"
        norm_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        check_close(f"FSDPxTP {name} step {step} grad norm", clip_grad_norm_(model, 0.05), norm_ref)
        if step == 0:
            grads = _full_grads(model)
            for n, p in ref.named_parameters():
                check_close(f"FSDPxTP {name} grad {n}", grads[n], p.grad)
        opt_ref.step(), opt.step()
        opt_ref.zero_grad(), opt.zero_grad()
    weights = full_state_dict(model)
    for n, p in ref.state_dict().items():
        check_close(f"FSDPxTP {name} trained {n}", weights[n], p)

    # checkpoint: 2-D layout -> own format -> TP over all 4 ranks, and one process
    save_full(model, ckpt_dir, dist.get_rank() == 0)
    dist.barrier()
    ids, _, seq_idx = _batch(STEPS, config.vocab_size, 2)
    with torch.no_grad():
        want = ref(ids, seq_idx=seq_idx)
        plain = LanguageModel.from_pretrained(ckpt_dir)
        check_close(f"checkpoint {name} one process logits", plain(ids, seq_idx=seq_idx), want)
        tp4 = parallelize_tensor(LanguageModel.from_pretrained(ckpt_dir), dist.group.WORLD)
        check_close(f"checkpoint {name} TP-4 logits", tp4(ids, seq_idx=seq_idx), want)
    dist.barrier()


def cp_tp_case(name, config, mesh):
    cp_group, tp_group = mesh.get_group("cp"), mesh.get_group("tp")
    ref = _reference(config)
    model = parallelize_context(parallelize_tensor(copy.deepcopy(ref), tp_group), cp_group)
    opt_ref, opt = _optimizer(ref), _optimizer(model)
    half = SEQLEN // 2
    cols = slice(mesh.get_local_rank("cp") * half, (mesh.get_local_rank("cp") + 1) * half)
    for step in range(STEPS):
        ids, targets, seq_idx = _batch(step, config.vocab_size, 2)
        want = ref(ids, seq_idx=seq_idx)
        got = model(ids[:, cols], seq_idx=seq_idx[:, cols])
        check_close(f"CPxTP {name} step {step} logits", got, want[:, cols])
        loss_ref, loss = _loss_sum(want, targets), _loss_sum(got, targets[:, cols])
        loss_ref.backward()
        loss.backward()
        sum_gradients(model, cp_group)
        if step == 0:
            grads = gather_full({n: p.grad for n, p in model.named_parameters()}, model.tp_plan, tp_group)
            for n, p in ref.named_parameters():
                check_close(f"CPxTP {name} grad {n}", grads[n], p.grad)
        opt_ref.step(), opt.step()
        opt_ref.zero_grad(), opt.zero_grad()
    weights = gather_full({n: p.detach() for n, p in model.named_parameters()}, model.tp_plan, tp_group)
    for n, p in ref.named_parameters():
        check_close(f"CPxTP {name} trained {n}", weights[n], p.detach())


if __name__ == "__main__":
    rank, world, group = setup()
    if world != 4:
        raise SystemExit(f"worker_2d.py needs 4 processes, got {world}")
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    for name, config in configs(world).items():
        fsdp_tp_case(name, config, mesh, f"{sys.argv[1]}/{name}")
    cp_mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("cp", "tp"))
    for name, config in configs(world).items():
        cp_tp_case(name, config, cp_mesh)
    finish("FSDP x TP and CP x TP OK on 4 ranks")
