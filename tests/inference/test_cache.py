"""InferenceCache: per-layer state types, shapes and dtypes; token accounting; reset in place."""

from __future__ import annotations

import pytest
import torch

from mambakit.inference import InferenceCache, KVCache, MambaState
from mambakit.models import LanguageModel, preset


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors: intra-op threads only add overhead (see tests/layers/conftest.py)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_hybrid(**over) -> LanguageModel:
    torch.manual_seed(0)
    config = preset(
        "hybrid-tiny",
        d_model=32,
        ssm={"d_state": 8, "headdim": 8, "ngroups": 2, "chunk_size": 8},
        attn={"num_heads": 4, "num_kv_heads": 2},
        mlp={"d_intermediate": 48},
        **over,
    )
    return LanguageModel(config).eval()


def test_states_follow_the_pattern():
    model = tiny_hybrid()
    cache = model.allocate_inference_cache(3, 20, dtype=torch.bfloat16)
    assert isinstance(cache, InferenceCache) and (cache.batch_size, cache.max_seqlen) == (3, 20)
    assert len(cache.states) == model.config.n_layer
    for ch, state in zip(model.config.pattern, cache.states):
        if ch == "M":
            assert isinstance(state, MambaState)
            assert (
                state.conv_state.shape == (3, 64 + 2 * 2 * 8, 3) and state.conv_state.dtype == torch.bfloat16
            )
            assert state.ssm_state.shape == (3, 8, 8, 8) and state.ssm_state.dtype == torch.float32
        elif ch == "*":
            assert isinstance(state, KVCache)
            assert state.k.shape == (3, 20, 2, 8) and state.k.dtype == torch.bfloat16
            assert state.v.shape == state.k.shape and state.doc_start.shape == (3,)
        else:
            assert state is None
    default = model.allocate_inference_cache(1, 4)
    assert default.states[0].conv_state.dtype == torch.float32


def test_mamba1_state_shapes():
    torch.manual_seed(0)
    model = LanguageModel(preset("tiny-mamba1", d_model=32, ssm={"d_state": 4}))
    state = model.allocate_inference_cache(2, 1).states[0]
    assert state.conv_state.shape == (2, 64, 3) and state.ssm_state.shape == (2, 64, 4)


@torch.no_grad()
def test_token_accounting_and_reset_in_place():
    model = tiny_hybrid()
    tokens = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    cache = model.allocate_inference_cache(2, 16)
    addresses = [
        t.data_ptr() for s in cache.states if s is not None for t in vars(s).values() if torch.is_tensor(t)
    ]
    first = torch.cat([model(tokens[:, :6], cache=cache), model.step(tokens[:, 6:7], cache)], dim=1)
    assert cache.seqlen_offset == 7
    assert all(s.seqlen_offset == 7 for s in cache.states if s is not None)
    assert any(s.ssm_state.abs().sum() > 0 for s in cache.states if isinstance(s, MambaState))
    cache.reset()
    assert cache.seqlen_offset == 0
    for s in cache.states:
        if s is not None:
            assert s.seqlen_offset == 0
            assert all(t.abs().sum() == 0 for t in vars(s).values() if torch.is_tensor(t))
    after = [
        t.data_ptr() for s in cache.states if s is not None for t in vars(s).values() if torch.is_tensor(t)
    ]
    assert after == addresses  # buffers kept (CUDA graphs capture their addresses)
    again = torch.cat([model(tokens[:, :6], cache=cache), model.step(tokens[:, 6:7], cache)], dim=1)
    torch.testing.assert_close(again, first, rtol=0, atol=0)


@torch.no_grad()
def test_attention_capacity():
    model = tiny_hybrid()
    cache = model.allocate_inference_cache(1, 4)
    model(torch.tensor([[1, 2, 3]]), cache=cache)
    model.step(torch.tensor([[4]]), cache)
    with pytest.raises(ValueError, match="max_seqlen"):
        model.step(torch.tensor([[5]]), cache)


@torch.no_grad()
def test_pure_ssm_decodes_past_max_seqlen():
    """SSM states have constant size: max_seqlen only bounds attention caches."""
    torch.manual_seed(0)
    model = LanguageModel(
        preset("tiny-mamba2", d_model=32, ssm={"d_state": 8, "headdim": 8, "chunk_size": 8})
    )
    tokens = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    cache = model.allocate_inference_cache(1, 2)
    steps = torch.cat([model.step(tokens[:, t : t + 1], cache) for t in range(9)], dim=1)
    torch.testing.assert_close(steps, model(tokens), rtol=1e-4, atol=1e-4)
