"""Every Triton load and store stays inside its tensors at the shapes of `mambakit train`'s default run.

`python -m mambakit train --device cuda` (tiny Mamba-2: d_model 128, d_inner 256, headdim 64, dstate 32,
chunk 64, conv dim 320, packed documents with int32 seq_idx, bf16 autocast) hit an illegal memory access
on an H100 during the first step's autotuning. Under the interpreter a bounds checker wraps the
interpreter's masked loads and stores: every address a mask lets through must lie inside one of the
tensors passed to that launch (its view, not just its storage, so a column or row overrun into a
neighbouring slice of the in_proj output counts too). Checked: each forward autotune config of the conv,
and a Mamba-2 layer's forward and backward with the launch parameters the GPU path computes (conv and
norm backward program counts) and each SSD tile config.
"""

from __future__ import annotations

import importlib
import os
import types

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="the bounds checker wraps Triton's interpreter"
)

D_MODEL, D_INNER, NHEADS, HEADDIM, DSTATE, CHUNK, WIDTH = 128, 256, 4, 64, 32, 64, 4
CONV_DIM = D_INNER + 2 * DSTATE
SEQLEN = 256


def _extent(t: torch.Tensor) -> tuple[int, int]:
    es = t.element_size()
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    lo = sum(min(0, (s - 1) * st) for s, st in zip(t.shape, t.stride()))
    hi = sum(max(0, (s - 1) * st) for s, st in zip(t.shape, t.stride())) + 1
    return t.data_ptr() + es * lo, t.data_ptr() + es * hi


@pytest.fixture
def bounds(monkeypatch):
    """Records every masked-in access outside the launch's tensors as (kernel, load/store, count)."""
    interp = importlib.import_module("triton.runtime.interpreter")
    state = {"views": [], "kernel": None, "bad": set(), "seen": set()}
    call, load, store = (
        interp.GridExecutor.__call__,
        interp.InterpreterBuilder.create_masked_load,
        interp.InterpreterBuilder.create_masked_store,
    )

    def _call(self, *args, **kwargs):
        ts = [a for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor)]
        state["views"] = [_extent(t) for t in ts]
        state["kernel"] = getattr(self.fn, "__name__", str(self.fn))
        state["seen"].add(state["kernel"])
        return call(self, *args, **kwargs)

    def _check(ptrs, mask, what):
        p = ptrs.data[mask.data.astype(bool)].astype(np.uint64)
        if p.size == 0:
            return
        size = np.dtype(interp._get_np_dtype(ptrs.get_element_ty())).itemsize
        ok = np.zeros(p.shape, dtype=bool)
        for lo, hi in state["views"]:
            ok |= (p >= lo) & (p + size <= hi)
        if not ok.all():
            state["bad"].add((state["kernel"], what, int((~ok).sum())))

    def _load(self, ptrs, mask, other, cache_policy, is_volatile):
        _check(ptrs, mask, "load")
        return load(self, ptrs, mask, other, cache_policy, is_volatile)

    def _store(self, ptrs, value, mask, cache_policy):
        _check(ptrs, mask, "store")
        return store(self, ptrs, value, mask, cache_policy)

    monkeypatch.setattr(interp.GridExecutor, "__call__", _call)
    monkeypatch.setattr(interp.InterpreterBuilder, "create_masked_load", _load)
    monkeypatch.setattr(interp.InterpreterBuilder, "create_masked_store", _store)
    return state


def test_bounds_checker_sees_an_overrun(bounds):
    import triton
    import triton.language as tl

    @triton.jit
    def overrun(p, BLOCK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        tl.store(p + o, tl.load(p + o) + 1)

    buf = torch.zeros(32)
    overrun[(1,)](buf[:10], BLOCK=16)  # inside the storage, past the view
    assert {(k, w) for k, w, _ in bounds["bad"]} == {("overrun", "load"), ("overrun", "store")}


def _seq_idx(batch: int) -> torch.Tensor:
    """int32 (batch, seqlen) document ids as the trainer builds them, with boundaries at chunk and
    tile edges (63, 64, 255) and mid-chunk."""
    s = torch.zeros(batch, SEQLEN, dtype=torch.int64)
    g = torch.Generator().manual_seed(1)
    for b in range(batch):
        for c in sorted(torch.randint(1, SEQLEN, (3,), generator=g).tolist()):
            s[b, c:] += 1
    s[0, 63:] += 1
    s[-1, 64:] += 1
    s[-1, 255:] += 1
    return (s - s[:, :1]).to(torch.int32)


def test_conv_forward_every_autotune_config_in_bounds(bounds):
    """conv dim 320 is not a multiple of the 128- and 256-channel tiles: column edges are exercised."""
    import triton
    import triton.language as tl

    co = importlib.import_module("mambakit.ops.conv1d.triton.ops")
    batch = 2
    zxbcdt = torch.randn(batch, SEQLEN, D_INNER + CONV_DIM + NHEADS).to(torch.bfloat16)
    xBC = zxbcdt[..., D_INNER : D_INNER + CONV_DIM]
    weight = torch.randn(CONV_DIM, 1, WIDTH)[:, 0, :]
    bias = torch.randn(CONV_DIM)
    seq = _seq_idx(batch)
    ref, _ = co.conv_fwd(xBC, weight, bias, True, None, False, seq)
    for cfg in co._FWD_CONFIGS:
        bl, bd = cfg.kwargs["BLOCK_L"], cfg.kwargs["BLOCK_D"]
        out = torch.empty_like(ref)
        grid = (triton.cdiv(SEQLEN, bl), triton.cdiv(CONV_DIM, bd), batch)
        co.conv_fwd_kernel[grid](
            xBC, weight, bias, xBC, seq, out, xBC, xBC, SEQLEN, CONV_DIM, *xBC.stride(), *weight.stride(),
            0, 0, 0, *seq.stride(), *out.stride(), 0, 0, 0, 0, 0, 0,
            WIDTH=WIDTH, HAS_BIAS=True, HAS_INIT=False, HAS_SEQ=True, SILU=True, STORE_FINAL=False,
            SILU_GRAD=False, ACC=tl.float32, BLOCK_L=bl, BLOCK_D=bd,
        )  # fmt: skip
        assert not bounds["bad"], f"config {bl}x{bd}: {sorted(bounds['bad'])}"
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize(
    "tiles", [None, (32, 32), "sequential"], ids=["default-tiles", "tiles-32x32", "sequential-paths"]
)
def test_mamba2_training_step_in_bounds(bounds, monkeypatch, tiles):
    """A layer's forward and backward at the default run's shapes, with the GPU path's program counts
    for the conv and norm backward (132 SMs, as an H100) and the given SSD tiles, or the sequential
    SSD forward and backward with their GPU step of 64 rows."""
    co = importlib.import_module("mambakit.ops.conv1d.triton.ops")
    no = importlib.import_module("mambakit.ops.norm.triton.ops")
    sb = importlib.import_module("mambakit.ops.ssd.triton.backward")
    from mambakit.layers.mamba2 import Mamba2

    monkeypatch.setenv("MAMBAKIT_BACKEND", "triton")
    monkeypatch.setattr(co, "_num_sms", lambda dev: 132)
    monkeypatch.setattr(no, "_interpreting", lambda: False)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda dev=None: types.SimpleNamespace(multi_processor_count=132)
    )
    conv_bwd, conv_fwd = co.conv_bwd, co.conv_fwd

    def gpu_conv_bwd(*args, **kwargs):  # the GPU branch of the launcher, then back to the interpreter's
        monkeypatch.setattr(co, "_interpreting", lambda: False)
        try:
            return conv_bwd(*args, **kwargs)
        finally:
            monkeypatch.setattr(co, "_interpreting", lambda: True)

    def interpreted_conv_fwd(*args, **kwargs):  # the backward's SiLU-gradient launch: no autotuner on CPU
        before = co._interpreting
        monkeypatch.setattr(co, "_interpreting", lambda: True)
        try:
            return conv_fwd(*args, **kwargs)
        finally:
            monkeypatch.setattr(co, "_interpreting", before)

    monkeypatch.setattr(co, "conv_bwd", gpu_conv_bwd)
    monkeypatch.setattr(co, "conv_fwd", interpreted_conv_fwd)
    # the output pass steps 64 rows at a time, as its GPU default does, or 32 with the 32 x 32 tiles
    sequential = tiles == "sequential"
    monkeypatch.setenv("MAMBAKIT_SSD_SCAN_CONFIG", "32,4,2" if tiles == (32, 32) else "64,4,2")
    if sequential:
        monkeypatch.setenv("MAMBAKIT_SSD_FWD_PATH", "sequential")
        monkeypatch.setenv("MAMBAKIT_SSD_BWD_PATH", "sequential")
        monkeypatch.setenv("MAMBAKIT_SSD_BWD_SEQ_CONFIG", "64,4,1")
    elif tiles is not None:
        fixed = {"BLOCK_M": tiles[0], "BLOCK_K": tiles[1]}
        monkeypatch.setattr(sb, "chunk_tiles", lambda block_q: fixed)

    torch.manual_seed(0)
    batch = 2
    layer = Mamba2(D_MODEL, d_state=DSTATE, headdim=HEADDIM, chunk_size=CHUNK)
    hidden = torch.randn(batch, SEQLEN, D_MODEL, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(hidden, seq_idx=_seq_idx(batch))
    y.float().square().mean().backward()
    assert not bounds["bad"], sorted(bounds["bad"])
    ran = {"conv_fwd_kernel", "conv_bwd_kernel", "norm_fwd_kernel", "norm_bwd_kernel"}
    ran |= {"chunk_cumsum_kernel", "chunk_scan_fwd_kernel"}
    if sequential:
        ran |= {"ssd_bwd_seq_kernel"}
    else:
        ran |= {"chunk_state_fwd_kernel", "state_passing_kernel", "chunk_state_bwd_kernel"}
        ran |= {"chunk_bwd_dx_kernel", "chunk_bwd_dB_kernel", "chunk_bwd_dC_kernel"}
    assert ran <= bounds["seen"], sorted(bounds["seen"])
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()
