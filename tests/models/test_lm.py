"""LanguageModel: decoding (prefill + steps, chunked prefill) equals one forward, packed documents equal
separate runs, gradients reach every parameter, initialization, input checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mambakit.models import AttentionConfig, LanguageModel, MLPConfig, ModelConfig, SSMConfig, preset

SMALL_SSM = {"d_state": 8, "headdim": 8, "chunk_size": 8}
CONFIGS = {
    "hybrid": lambda: preset(
        "hybrid-tiny",
        d_model=32,
        vocab_size=100,
        ssm=SMALL_SSM,
        attn={"num_heads": 4, "num_kv_heads": 2, "rotary_emb_dim": 4},
        mlp={"d_intermediate": 64, "activation": "swiglu"},
    ),
    "hybrid-mamba1": lambda: ModelConfig(
        d_model=32,
        vocab_size=100,
        pattern="M*-M",
        ssm=SSMConfig(version=1, d_state=8),
        attn=AttentionConfig(num_heads=2),
        mlp=MLPConfig(d_intermediate=48, activation="relu2"),
        residual_in_fp32=False,
        tie_embeddings=False,
    ),
    "mamba1": lambda: preset("tiny-mamba1", d_model=32, vocab_size=100, pattern="MMM", ssm={"d_state": 8}),
    "mamba2": lambda: preset("tiny-mamba2", d_model=32, vocab_size=100, pattern="MMM", ssm=SMALL_SSM),
}


def make(kind: str, seed: int = 0) -> LanguageModel:
    torch.manual_seed(seed)
    return LanguageModel(CONFIGS[kind]()).eval()


def ids(batch: int, seqlen: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 100, (batch, seqlen), generator=torch.Generator().manual_seed(seed))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-4) -> None:
    assert torch.isfinite(actual).all() and torch.isfinite(expected).all()
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * expected.abs().max().item())


def decode(model: LanguageModel, tokens: torch.Tensor, prefills: list[int], ssm_dtype=None) -> torch.Tensor:
    cache = model.allocate_inference_cache(tokens.shape[0], tokens.shape[1] + 4, ssm_dtype=ssm_dtype)
    outs, pos = [], 0
    for n in prefills:
        outs.append(model(tokens[:, pos : pos + n], cache=cache))
        pos += n
    for t in range(pos, tokens.shape[1]):
        outs.append(model.step(tokens[:, t : t + 1], cache))
    assert cache.seqlen_offset == tokens.shape[1]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("prefills", [[9], [3, 11]], ids=["prefill", "chunked-prefill"])
@torch.no_grad()
def test_decoding_equals_forward(kind, prefills):
    model, tokens = make(kind), ids(2, 20)
    full = model(tokens)
    assert full.shape == (2, 20, 100)
    assert_close(decode(model, tokens, prefills), full)


@pytest.mark.parametrize("kind", list(CONFIGS))
@torch.no_grad()
def test_bfloat16_ssm_states_decode_at_bfloat16_precision(kind):
    """A cache with bfloat16 SSM states (half the decoding memory) gives the full forward's logits to
    bfloat16 precision, through a chunked prefill (which reads the rounded state back) and steps."""
    model, tokens = make(kind), ids(2, 20)
    cache = model.allocate_inference_cache(2, 8, ssm_dtype=torch.bfloat16)
    ssm = [s.ssm_state for s in cache.states if s is not None and hasattr(s, "ssm_state")]
    assert ssm and all(t.dtype == torch.bfloat16 for t in ssm)
    assert all(s.k.dtype == torch.float32 for s in cache.states if s is not None and hasattr(s, "k"))
    full = model(tokens)
    assert_close(decode(model, tokens, [3, 11], ssm_dtype=torch.bfloat16), full, tol=2e-2)
    with pytest.raises(ValueError, match="ssm_dtype"):
        model.allocate_inference_cache(2, 8, ssm_dtype=torch.int8)


@pytest.mark.parametrize("kind", list(CONFIGS))
@torch.no_grad()
def test_packed_documents_equal_separate_runs(kind):
    model, tokens = make(kind), ids(2, 24)
    seq_idx = torch.tensor([[0] * 5 + [1] * 19, [0] * 13 + [1] * 1 + [2] * 10])
    out = model(tokens, seq_idx=seq_idx)
    for b, bounds in ((0, [0, 5, 24]), (1, [0, 13, 14, 24])):
        for s, e in zip(bounds, bounds[1:]):
            assert_close(out[b : b + 1, s:e], model(tokens[b : b + 1, s:e]))
    cu_seqlens = torch.tensor([0, 13, 14, 24], dtype=torch.int32)
    assert_close(model(tokens[1:], cu_seqlens=cu_seqlens), out[1:])


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_backward_reaches_every_parameter(kind):
    model = make(kind).train()
    tokens = ids(2, 17)
    logits = model(tokens[:, :-1], seq_idx=torch.tensor([[0] * 6 + [1] * 10, [0] * 16]))
    F.cross_entropy(logits.reshape(-1, 100), tokens[:, 1:].reshape(-1)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("loss_path", ["logits", "linear_cross_entropy"])
def test_tied_embedding_gradient_is_dense_and_equals_the_dense_lookup(monkeypatch, loss_path):
    """On the CPU a tied embedding's lookup has a sparse gradient (models/lm.py `_embed`); what reaches
    .grad must be the dense sum, equal to the plain dense lookup's, through either loss path."""
    from mambakit.training.loss import lm_loss

    tokens = ids(2, 12)
    targets = tokens.roll(-1, dims=1)

    def grads(model):
        model.zero_grad(set_to_none=True)
        if loss_path == "logits":
            F.cross_entropy(model(tokens).reshape(-1, 100), targets.reshape(-1)).backward()
        else:
            lm_loss(model, tokens, targets).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    model = make("mamba2").train()
    assert model.lm_head.weight is model.backbone.embedding.weight
    got = grads(model)
    assert all(g.layout == torch.strided for g in got.values())
    monkeypatch.setattr(type(model), "_embed", lambda self, x: F.embedding(x, self.backbone.embedding.weight))
    want = grads(model)
    for name in want:
        assert_close(got[name], want[name], tol=1e-6)


def test_padded_vocab_and_tied_head():
    model = make("hybrid")
    assert model.backbone.embedding.weight.shape == (112, 32)  # 100 padded to a multiple of 16
    assert model.lm_head.weight is model.backbone.embedding.weight
    n = sum(p.numel() for p in model.parameters())
    assert model.num_parameters() == n
    assert model.num_parameters(exclude_embedding=True) == n - 112 * 32
    untied = make("hybrid-mamba1")
    assert untied.lm_head.weight is not untied.backbone.embedding.weight
    assert untied.num_parameters() == sum(p.numel() for p in untied.parameters())


def test_initialization():
    torch.manual_seed(0)
    config = preset("hybrid-tiny", d_model=256, pattern="M*-M", attn={"num_heads": 4, "num_kv_heads": 4})
    model = LanguageModel(config)
    std = config.initializer_range
    layers = model.backbone.layers
    assert abs(model.backbone.embedding.weight.std().item() - std) < 0.1 * std
    assert abs(layers[0].mixer.in_proj.weight.std().item() - std) < 0.1 * std
    assert abs(layers[1].mixer.in_proj.weight.std().item() - std) < 0.1 * std
    assert abs(layers[2].mixer.fc1.weight.std().item() - std) < 0.1 * std
    for out in (layers[0].mixer.out_proj.weight, layers[1].mixer.out_proj.weight, layers[2].mixer.fc2.weight):
        # kaiming-uniform(a=sqrt(5)) has std 1 / sqrt(3 fan_in); then / sqrt(n_layer)
        want = 1 / math.sqrt(3 * out.shape[1]) / math.sqrt(config.n_layer)
        assert abs(out.std().item() - want) < 0.1 * want
    m = layers[0].mixer  # the SSM-specific inits survive the model-wide init
    lo, hi = config.ssm.A_init_range
    assert bool(((torch.exp(m.A_log) >= lo) & (torch.exp(m.A_log) <= hi)).all())
    assert torch.equal(m.D, torch.ones_like(m.D))
    dt = F.softplus(m.dt_bias)
    assert bool((dt >= config.ssm.dt_init_floor - 1e-7).all() and (dt <= config.ssm.dt_max + 1e-6).all())
    assert torch.equal(m.norm.weight, torch.ones_like(m.norm.weight))

    torch.manual_seed(0)
    m1 = LanguageModel(preset("tiny-mamba1")).backbone.layers[0].mixer
    bound = m1.dt_rank**-0.5
    assert m1.dt_proj.weight.abs().max() <= bound and m1.dt_proj.weight.std() > bound / 3  # not normal(0.02)
    assert m1.dt_proj.bias.abs().min() > 0  # not zeroed


@pytest.mark.parametrize("kind", ["mamba1", "hybrid"])
def test_logits_to_keep_is_the_last_positions_of_the_full_forward(kind):
    model = make(kind).eval()
    tokens = ids(2, 9)
    with torch.no_grad():
        full = model(tokens)
        for k in (1, 4, 9):
            assert_close(model(tokens, logits_to_keep=k), full[:, -k:], tol=1e-5)
        hidden = model(tokens, return_hidden_states=True)
        assert_close(model(tokens, return_hidden_states=True, logits_to_keep=3), hidden[:, -3:], tol=1e-5)
    for bad in (0, 10, 2.0, True):
        with pytest.raises(ValueError, match="logits_to_keep"):
            model(tokens, logits_to_keep=bad)


def test_input_checks():
    model = make("hybrid")
    with pytest.raises(TypeError, match="input_ids"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.tensor([[1, 2, 100]]))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.tensor([[1, -1]]))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(2, 0, dtype=torch.long))
    cache = model.allocate_inference_cache(2, 8)
    with pytest.raises(ValueError, match="cache"):
        model(ids(3, 4), cache=cache)
    with pytest.raises(ValueError, match="cache"):
        model.step(ids(1, 1), cache)
    with pytest.raises(ValueError, match="input_ids"):
        model.step(ids(2, 2), cache)
    with pytest.raises(TypeError, match="cache"):
        model.step(ids(2, 1), cache.states)
    with pytest.raises(ValueError, match="max_seqlen"):
        model.allocate_inference_cache(2, 0)


def test_from_preset():
    torch.manual_seed(0)
    model = LanguageModel.from_preset("tiny-mamba2", d_model=32, ssm=SMALL_SSM)
    assert model.config.d_model == 32 and model.config.ssm.d_state == 8
    assert model(ids(1, 5)).shape == (1, 5, 256)


@torch.no_grad()
def test_bfloat16_decoding_matches_forward():
    model = make("hybrid").to(torch.bfloat16)
    tokens = ids(2, 12)
    full = model(tokens)
    assert full.dtype == torch.bfloat16
    assert_close(decode(model, tokens, [5]).float(), full.float(), tol=3e-2)
    assert_close(full.float(), make("hybrid")(tokens), tol=5e-2)
