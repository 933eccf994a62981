"""generate(): equal to a greedy loop over full forwards, per-row correct on batches of mixed prompt
lengths, deterministic per seed, eos handling, streaming, argument checks; CUDA graph == eager on GPU."""

import pytest
import torch

from mambakit.inference.generate import generate, prepare_prompts, stream_generate
from mambakit.layers.attention import Attention, enable_static_position
from mambakit.models.lm import LanguageModel

PRESETS = ["tiny-mamba1", "tiny-mamba2", "hybrid-tiny"]
PROMPTS = [
    [5, 17, 99, 3, 42, 8, 120],
    [200, 1],
    [64, 64, 7, 250],
    [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21],
]


def make_model(name: str, dtype=torch.float64, device=None) -> LanguageModel:
    torch.manual_seed(0)
    # untied head and a wider init: tiny random models then do not just repeat their input
    model = LanguageModel.from_preset(
        name, tie_embeddings=False, initializer_range=0.1, device=device, dtype=dtype
    )
    return model.eval()


@pytest.fixture(scope="module", params=PRESETS)
def model(request):
    return make_model(request.param)


def greedy_by_full_forward(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


def test_greedy_equals_full_forward_loop(model):
    for prompt in PROMPTS[:2]:
        out = generate(model, [prompt], max_new_tokens=8, temperature=0)
        assert out.row(0) == greedy_by_full_forward(model, prompt, 8)
        assert out.lengths == [8] and out.prompt_lengths == [len(prompt)]


def test_mixed_length_batch_equals_each_row_alone(model):
    batch = generate(model, PROMPTS, max_new_tokens=6, temperature=0)
    for i, prompt in enumerate(PROMPTS):
        assert batch.row(i) == generate(model, [prompt], max_new_tokens=6, temperature=0).row(0)
    # the same through a padded tensor with an attention mask (right padding here)
    width = max(map(len, PROMPTS))
    ids = torch.zeros(len(PROMPTS), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(PROMPTS):
        ids[i, : len(p)], mask[i, : len(p)] = torch.tensor(p), 1
    padded = generate(model, ids, attention_mask=mask, max_new_tokens=6, temperature=0)
    assert torch.equal(padded.tokens, batch.tokens)


def test_sampling_mixed_batch_rows_match_alone_with_same_noise():
    # sampled rows: the same per-row distribution; with top_k=1 the draw is the argmax, so rows match
    model = make_model("hybrid-tiny")
    out = generate(model, PROMPTS, max_new_tokens=5, temperature=0.7, top_k=1, repetition_penalty=1.3, seed=1)
    for i, p in enumerate(PROMPTS):
        alone = generate(
            model, [p], max_new_tokens=5, temperature=0.7, top_k=1, repetition_penalty=1.3, seed=1
        )
        assert out.row(i) == alone.row(0)


def test_seed_determinism():
    model = make_model("tiny-mamba2")
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.9, min_p=0.01, top_k=50, repetition_penalty=1.2)
    a = generate(model, PROMPTS, seed=7, **kw)
    b = generate(model, PROMPTS, seed=7, **kw)
    c = generate(model, PROMPTS, seed=8, **kw)
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, c.tokens)
    g = torch.Generator().manual_seed(7)
    assert torch.equal(generate(model, PROMPTS, generator=g, **kw).tokens, a.tokens)


def test_eos_stops_each_row_and_pads():
    model = make_model("tiny-mamba1")
    free = generate(model, PROMPTS, max_new_tokens=8, temperature=0)
    eos = free.tokens[0, 2].item()  # row 0 emits it at step 2
    out = generate(model, PROMPTS, max_new_tokens=8, temperature=0, eos_token_id=[eos], pad_token_id=0)
    assert out.lengths[0] == 3 and out.row(0) == free.row(0)[:3]
    assert out.tokens[0, 3:].eq(0).all()
    for i in range(len(PROMPTS)):
        row = free.tokens[i].tolist()
        n = row.index(eos) + 1 if eos in row else 8
        assert out.lengths[i] == n and out.row(i) == row[:n]
    # every row stops: the loop ends early
    first = free.tokens[:, 0].tolist()
    out = generate(model, PROMPTS, max_new_tokens=8, temperature=0, eos_token_id=first)
    assert out.tokens.shape == (len(PROMPTS), 1) and out.lengths == [1] * len(PROMPTS)


def test_streaming_yields_the_same_tokens():
    model = make_model("hybrid-tiny")
    kw = dict(max_new_tokens=7, temperature=0.8, seed=3)
    out = generate(model, PROMPTS, **kw)
    streamed = torch.stack(list(stream_generate(model, PROMPTS, **kw)), dim=1)
    assert torch.equal(streamed, out.tokens)
    got = []
    generate(model, PROMPTS, callback=got.append, **kw)
    assert torch.equal(torch.stack(got, dim=1), out.tokens)


def test_method_and_zero_new_tokens():
    model = make_model("tiny-mamba2")
    out = model.generate(torch.tensor(PROMPTS[0]), max_new_tokens=0)
    assert out.tokens.shape == (1, 0)
    assert model.generate([PROMPTS[0]], max_new_tokens=3, temperature=0).row(0) == greedy_by_full_forward(
        model, PROMPTS[0], 3
    )


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"temperature": -1.0}, "temperature"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"max_seqlen": 8}, "max_seqlen"),
        ({"eos_token_id": 10_000}, "eos_token_id"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    model = make_model("hybrid-tiny")
    with pytest.raises(ValueError, match=name):
        generate(model, [PROMPTS[3]], **{"max_new_tokens": 4, **kwargs})


def test_bad_prompts():
    model = make_model("tiny-mamba1")
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1, 2], []])
    with pytest.raises(ValueError, match="vocab_size"):
        generate(model, [[1, 300]])


def test_prepare_prompts_left_pads_and_marks_padding():
    ids, seq_idx, lengths = prepare_prompts([[1, 2, 3], [4]], None, 9, 256, "cpu")
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]]
    assert seq_idx.tolist() == [[1, 1, 1], [0, 0, 1]] and lengths == [3, 1]
    assert prepare_prompts([[1, 2], [3, 4]], None, 0, 256, "cpu")[1] is None


def test_attention_static_step_equals_dynamic_step():
    # the CUDA-graph-safe attention step (device position, full static cache under a mask)
    torch.manual_seed(0)
    attn = Attention(32, 4, 2, rotary_emb_dim=4, dtype=torch.float64)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    seq_idx = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    outs = []
    for static in (False, True):
        cache = attn.allocate_inference_cache(2, 9)
        if static:
            enable_static_position(cache)
        attn(x, seq_idx=seq_idx, cache=cache)
        outs.append(
            torch.cat(
                [
                    attn.step(
                        torch.randn(
                            2, 1, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(i)
                        ),
                        cache,
                    )
                    for i in range(4)
                ],
                1,
            )
        )
        assert cache.seqlen_offset == 9
    torch.testing.assert_close(outs[0], outs[1])


@pytest.mark.gpu
@pytest.mark.parametrize("name", PRESETS)
def test_cuda_graph_equals_eager(name):
    model = make_model(name, dtype=torch.float32, device="cuda")
    kw = dict(max_new_tokens=16, temperature=0)
    eager = generate(model, PROMPTS, cuda_graph=False, **kw)
    graph = generate(model, PROMPTS, cuda_graph=True, **kw)
    assert torch.equal(graph.tokens, eager.tokens)
    # replayed again (the captured decoder is reused) and with sampling
    kw = dict(max_new_tokens=16, temperature=0.9, top_p=0.9, seed=0)
    assert torch.equal(
        generate(model, PROMPTS, **kw).tokens, generate(model, PROMPTS, cuda_graph=False, **kw).tokens
    )
    # a smaller batch captures its own graph
    assert generate(model, PROMPTS[:1], max_new_tokens=8, temperature=0).row(0) == eager.row(0)[:8]


def test_bfloat16_ssm_states_reach_the_cache_and_keep_greedy_tokens():
    """generate(ssm_dtype=torch.bfloat16) decodes from bfloat16 SSM states: on these models (float32,
    logits far apart) the greedy tokens equal the float32-state run's, and the streaming path honours
    the argument too (the bfloat16 cache is what `allocate_inference_cache` hands out)."""
    model = make_model("hybrid-tiny", dtype=torch.float32)
    kw = dict(max_new_tokens=8, temperature=0)
    want = generate(model, PROMPTS, **kw)
    assert torch.equal(generate(model, PROMPTS, ssm_dtype=torch.bfloat16, **kw).tokens, want.tokens)
    streamed = torch.stack(list(stream_generate(model, PROMPTS, ssm_dtype=torch.bfloat16, **kw)), dim=1)
    assert torch.equal(streamed, want.tokens)
    with pytest.raises(ValueError, match="ssm_dtype"):
        generate(model, PROMPTS, ssm_dtype=torch.int32, **kw)


@pytest.mark.gpu
def test_compiled_cuda_graph_equals_eager():
    model = make_model("tiny-mamba2", dtype=torch.float32, device="cuda")
    kw = dict(max_new_tokens=12, temperature=0)
    eager = generate(model, PROMPTS, cuda_graph=False, **kw)
    assert torch.equal(generate(model, PROMPTS, compile=True, **kw).tokens, eager.tokens)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["tiny-mamba1", "tiny-mamba2"])
def test_cuda_graph_with_bfloat16_ssm_states_equals_eager(name):
    model = make_model(name, dtype=torch.float32, device="cuda")
    kw = dict(max_new_tokens=16, temperature=0, ssm_dtype=torch.bfloat16)
    eager = generate(model, PROMPTS, cuda_graph=False, **kw)
    assert torch.equal(generate(model, PROMPTS, cuda_graph=True, **kw).tokens, eager.tokens)


@pytest.mark.gpu
@pytest.mark.parametrize("name", PRESETS)
def test_greedy_in_graph_with_eos_equals_eager(name):
    """Greedy decoding takes the argmax inside the CUDA graph and feeds it back there; with an eos that
    ends some rows early, the tokens and lengths equal the eager loop's (which feeds the pad)."""
    model = make_model(name, dtype=torch.float32, device="cuda")
    kw = dict(max_new_tokens=16, temperature=0)
    free = generate(model, PROMPTS, cuda_graph=False, **kw)
    eos = int(free.tokens[1, 3])  # ends row 1 after 4 tokens, and any other row that meets it
    eager = generate(model, PROMPTS, cuda_graph=False, eos_token_id=eos, pad_token_id=0, **kw)
    graph = generate(model, PROMPTS, cuda_graph=True, eos_token_id=eos, pad_token_id=0, **kw)
    assert eager.lengths[1] <= 4 and eager.lengths != [16] * len(PROMPTS)
    assert torch.equal(graph.tokens, eager.tokens) and graph.lengths == eager.lengths


@pytest.mark.gpu
def test_streamed_graph_tokens_survive_the_next_generation():
    """stream_generate yields copies of the graph's token history: a later generation with the same
    batch size (which reuses the decoder and rewrites the history) leaves them as they were."""
    model = make_model("tiny-mamba1", dtype=torch.float32, device="cuda")
    kw = dict(max_new_tokens=10, temperature=0)
    streamed = list(stream_generate(model, PROMPTS, **kw))
    kept = [t.clone() for t in streamed]
    other = generate(model, [list(reversed(p)) for p in PROMPTS], **kw)
    assert not torch.equal(other.tokens, torch.stack(kept, 1).cpu())
    assert all(torch.equal(a, b) for a, b in zip(streamed, kept))
    eager = generate(model, PROMPTS, cuda_graph=False, **kw)
    assert torch.equal(torch.stack(streamed, 1).cpu(), eager.tokens)


@pytest.mark.gpu
def test_greedy_cuda_graph_decoder_feeds_its_argmax_back():
    from mambakit.inference.cuda_graph import CUDAGraphDecoder

    model = make_model("hybrid-tiny", dtype=torch.float32, device="cuda")
    greedy = CUDAGraphDecoder(model, 2, 8, greedy=True)
    plain = CUDAGraphDecoder(model, 2, 8)
    with pytest.raises(ValueError, match="tokens=None"):
        greedy.step(None)
    with pytest.raises(ValueError, match="last_tokens"):
        greedy.last_tokens()
    with pytest.raises(ValueError, match="tokens=None"):
        plain.step(None)
    tokens = torch.tensor([3, 77], device="cuda")
    logits = greedy.step(tokens)
    argmaxes = []
    for _ in range(5):
        want = plain.step(tokens)
        torch.testing.assert_close(logits, want, rtol=0, atol=0)
        tokens = want.argmax(-1)
        argmaxes.append(tokens)
        assert torch.equal(greedy.last_tokens(), tokens)
        logits = greedy.step(None)
    assert torch.equal(greedy.history[:, :5], torch.stack(argmaxes, 1))
    greedy.reset()
    with pytest.raises(ValueError, match="last_tokens"):
        greedy.last_tokens()
