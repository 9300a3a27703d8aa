import pytest
import torch


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A tiny random-weight LLaMA saved as an HF folder (safetensors + a real tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    vocab = {chr(i): i - 32 for i in range(32, 127)}
    vocab["<unk>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<unk>")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def default_model():
    """The embedded default (SmolLM2-135M-Instruct), loaded once per test session."""
    from lowbit.model.load import load_source

    return load_source(None)


@pytest.fixture(scope="session")
def tokenizer(tiny_llama):
    """The tiny model's character-level tokenizer (vocab 96)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture(scope="session")
def calib(tmp_path_factory):
    """4 x 32 tokens of seeded random words: calibration for tiny models."""
    import random

    from lowbit.calib import CalibrationConfig

    r = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "Quantize", "42", "model!"]
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(" ".join(r.choice(words) for _ in range(1000)))
    return CalibrationConfig(samples=4, seqlen=32, text=str(path))
