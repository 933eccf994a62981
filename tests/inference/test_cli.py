"""`mambakit generate` end to end on a tiny saved model: byte tokenizer fallback and a tokenizer.json."""

import pytest
import torch

from mambakit.cli import main
from mambakit.models.lm import LanguageModel


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny")
    # vocab 300: the 257 ids of the byte tokenizer fit, and so does a small BPE vocabulary
    LanguageModel.from_preset("hybrid-tiny", vocab_size=300, tie_embeddings=False).save_pretrained(directory)
    return directory


def test_generate_byte_tokenizer(model_dir, capsys):
    argv = ["generate", "--model", str(model_dir), "--prompt", "Hello", "--max-new-tokens", "12"]
    assert main([*argv, "--temperature", "0.8", "--seed", "1", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("Hello")
    assert "tokens/s" in err and "cuda graph off" in err
    # deterministic for a seed
    assert main([*argv, "--temperature", "0.8", "--seed", "1", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == out


def test_generate_greedy_matches_library(model_dir, capsys):
    from mambakit.training.tokenizer import ByteTokenizer

    model = LanguageModel.from_pretrained(model_dir).eval()
    tok = ByteTokenizer()
    want = model.generate([tok.encode("abc").tolist()], max_new_tokens=10, temperature=0, eos_token_id=256)
    argv = ["generate", "--model", str(model_dir), "--prompt", "abc", "--max-new-tokens", "10"]
    assert main([*argv, "--temperature", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out == "abc" + tok.decode([t for t in want.row(0) if t != 256]) + "\n"


def test_generate_tokenizer_json_and_batch(model_dir, tmp_path, capsys):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=280,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(["the cat sat on the mat"] * 20, trainer=trainer)
    directory = tmp_path / "with_tok"
    directory.mkdir()
    for f in model_dir.iterdir():
        (directory / f.name).write_bytes(f.read_bytes())
    tok.save(str(directory / "tokenizer.json"))
    argv = ["generate", "--model", str(directory), "--prompt", "the cat", "--prompt", "a", "--device", "cpu"]
    assert main([*argv, "--max-new-tokens", "5", "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("[0] the cat") and "\n[1] a" in out
    assert "tokens/s" in err


@pytest.mark.parametrize(
    "extra, name",
    [
        (["--top-p", "0"], "top_p"),
        (["--temperature", "-1"], "temperature"),
        (["--max-new-tokens", "-2"], "max_new_tokens"),
    ],
)
def test_bad_arguments(model_dir, extra, name):
    argv = ["generate", "--model", str(model_dir), "--prompt", "x", "--device", "cpu", *extra]
    with pytest.raises(SystemExit, match=name):
        main(argv)


def test_missing_model_dir(tmp_path):
    with pytest.raises(SystemExit, match="config.json"):
        main(["generate", "--model", str(tmp_path), "--prompt", "x"])
