"""Sampling filters against small hand-computed examples, and the argument checks."""

import math

import pytest
import torch

from mambakit.inference.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    min_p_filter,
    process_logits,
    sample,
    top_k_filter,
    top_p_filter,
)

INF = math.inf


def kept(logits: torch.Tensor) -> list[list[int]]:
    return [torch.isfinite(row).nonzero().flatten().tolist() for row in logits]


def log_probs(*p: float) -> torch.Tensor:
    return torch.tensor([p]).log()


def test_top_k_keeps_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0], [0.0, -1.0, 2.0, 1.0, 3.0]])
    assert kept(top_k_filter(logits, 2)) == [[1, 3], [2, 4]]
    assert kept(top_k_filter(logits, 1)) == [[1], [4]]
    assert top_k_filter(logits, 0) is logits  # off
    assert torch.equal(top_k_filter(logits, 5), logits)


def test_top_p_keeps_smallest_set_reaching_p():
    logits = log_probs(0.1, 0.5, 0.15, 0.25)  # sorted: 0.5 (1), 0.25 (3), 0.15 (2), 0.1 (0)
    assert kept(top_p_filter(logits, 0.5)) == [[1]]  # 0.5 alone reaches 0.5
    assert kept(top_p_filter(logits, 0.6)) == [[1, 3]]  # 0.75 >= 0.6
    assert kept(top_p_filter(logits, 0.75)) == [[1, 3]]
    assert kept(top_p_filter(logits, 0.8)) == [[1, 2, 3]]  # 0.9 >= 0.8
    assert kept(top_p_filter(logits, 0.01)) == [[1]]  # the top token always stays
    assert kept(top_p_filter(logits, 1.0)) == [[0, 1, 2, 3]]


def test_min_p_is_relative_to_the_most_likely_token():
    logits = log_probs(0.5, 0.3, 0.15, 0.05)
    assert kept(min_p_filter(logits, 0.5)) == [[0, 1]]  # threshold 0.25
    assert kept(min_p_filter(logits, 0.3)) == [[0, 1, 2]]  # threshold 0.15 keeps 0.15
    assert kept(min_p_filter(logits, 1.0)) == [[0]]
    assert kept(min_p_filter(logits, 0.0)) == [[0, 1, 2, 3]]


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0]]
    # a penalty > 1 always lowers a seen token's logit
    assert (out[seen] < logits[seen]).all()


def test_temperature_scales_and_zero_is_greedy():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    assert torch.allclose(process_logits(logits, SamplingParams(temperature=2.0)), logits / 2)
    assert sample(logits, SamplingParams(temperature=0.0)).tolist() == [1]
    assert sample(logits, SamplingParams(top_k=1)).tolist() == [1]


def test_sample_draws_only_kept_tokens_and_follows_the_distribution():
    g = torch.Generator().manual_seed(0)
    logits = log_probs(0.1, 0.6, 0.3).expand(4000, 3)
    draws = sample(logits, SamplingParams(temperature=1.0), generator=g)
    freq = torch.bincount(draws, minlength=3).float() / draws.numel()
    assert torch.allclose(freq, torch.tensor([0.1, 0.6, 0.3]), atol=0.03)
    draws = sample(logits, SamplingParams(top_k=2), generator=g)
    assert set(draws.tolist()) == {1, 2}


def test_sample_is_deterministic_for_a_seed():
    logits = torch.randn(8, 50)
    params = SamplingParams(temperature=0.9, top_p=0.95)
    a = sample(logits, params, generator=torch.Generator().manual_seed(3))
    b = sample(logits, params, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"temperature": INF}, "temperature"),
    ],
)
def test_bad_parameters_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_greedy_takes_the_first_maximum_of_the_logits_as_given(dtype):
    """Greedy without a penalty skips the float32 copy: same token, ties to the first maximum."""
    logits = torch.randn(6, 500, generator=torch.Generator().manual_seed(0)).to(dtype)
    logits[0, 7] = logits[0, 300] = logits[0].max() + 1  # a tie
    got = sample(logits, SamplingParams(temperature=0.0))
    assert got.dtype == torch.int64 and got[0].item() == 7
    assert torch.equal(got, logits.float().argmax(-1))
    seen = torch.zeros(6, 500, dtype=torch.bool)
    with_penalty = sample(logits, SamplingParams(temperature=0.0, repetition_penalty=1.0 + 1e-6), seen)
    assert torch.equal(with_penalty, got)  # nothing seen: the penalty path agrees
