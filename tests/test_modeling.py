"""Model building from a user's directory: the bad inputs build_model refuses in one line (a tokenizer
larger than the model's embedding, --data.max_length beyond the model's positions) and the opt-in resize.
In-process: these are checks on a loaded model, no training or process group involved."""

from __future__ import annotations

import pytest
from conftest import bpe_tokenizer, save_pretrained_dir

from dtrain.config import DataConfig, EvalConfig, ModelConfig, UserError
from dtrain.modeling import build_model, build_tokenizer, max_positions

TEXTS = [
    f"### Instruction:\nRepeat {w}.\n\n### Response:\n{w} {w}" for w in ("apple", "river", "stone", "music")
]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A GPT-2 (256 positions) whose embedding has fewer rows than a second, larger tokenizer has tokens."""
    root = tmp_path_factory.mktemp("modeling")
    small, big = (
        bpe_tokenizer(TEXTS, pad=False, vocab_size=270),
        bpe_tokenizer(TEXTS, pad=False, vocab_size=300),
    )
    assert len(big) > len(small)
    model = save_pretrained_dir(root / "gpt2", "gpt2", small, vocab_size=len(small), max_positions=256)
    big.save_pretrained(root / "big-tokenizer")
    return {"model": model, "big": root / "big-tokenizer", "rows": len(small), "tokens": len(big)}


def _build(model_cfg: ModelConfig, data: DataConfig | None = None):
    tok = build_tokenizer(model_cfg)
    return build_model(model_cfg, tok, data or DataConfig(), EvalConfig()), tok


def test_matching_tokenizer_loads(dirs):
    model, tok = _build(ModelConfig(name_or_path=str(dirs["model"])))
    assert model.get_input_embeddings().num_embeddings == len(tok) == dirs["rows"]
    assert max_positions(model.config) == 256


def test_larger_tokenizer_is_refused_naming_both_sizes_and_the_fix(dirs):
    cfg = ModelConfig(name_or_path=str(dirs["model"]), tokenizer=str(dirs["big"]))
    with pytest.raises(UserError) as err:
        _build(cfg)
    msg = str(err.value)
    assert "\n" not in msg
    assert "--model.tokenizer" in msg and "--model.name_or_path" in msg
    assert f"{dirs['tokens']} tokens" in msg and f"{dirs['rows']} embedding rows" in msg
    assert "--model.resize_embeddings true" in msg


def test_larger_tokenizer_resized_when_asked(dirs):
    cfg = ModelConfig(name_or_path=str(dirs["model"]), tokenizer=str(dirs["big"]), resize_embeddings=True)
    model, tok = _build(cfg)
    assert model.get_input_embeddings().num_embeddings == len(tok) == dirs["tokens"]
    assert model.get_output_embeddings().weight.shape[0] == dirs["tokens"]
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied


def test_max_length_beyond_the_model_positions_is_refused(dirs):
    with pytest.raises(UserError) as err:
        _build(ModelConfig(name_or_path=str(dirs["model"])), DataConfig(max_length=512))
    msg = str(err.value)
    assert "\n" not in msg
    assert "--data.max_length 512" in msg and "max_position_embeddings 256" in msg
    assert "--data.max_length 256 or less" in msg
    # the limit itself is fine, and so is a larger max_length while no example reaches the limit
    _build(ModelConfig(name_or_path=str(dirs["model"])), DataConfig(max_length=256))
    model_cfg = ModelConfig(name_or_path=str(dirs["model"]))
    tok = build_tokenizer(model_cfg)

    def with_longest(longest: int):
        return build_model(model_cfg, tok, DataConfig(max_length=512), EvalConfig(), longest=longest)

    with_longest(200)
    with pytest.raises(UserError, match="the longest example has 300 tokens"):
        with_longest(300)


def test_embedded_model_always_fits():
    """The embedded Llama is sized from the data config: never refused."""
    cfg = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    model, tok = _build(cfg, DataConfig(max_length=1024))
    assert max_positions(model.config) >= 1024 and model.get_input_embeddings().num_embeddings == len(tok)


def test_flops_per_token_counts_matmuls_without_the_input_embedding_plus_attention():
    """torchtitan's count, recomputed here from the model's own tensors: 6 x non-embedding parameters
    plus 12 x layers x heads x head_dim x sequence length."""
    import transformers

    from dtrain.modeling import flops_per_token

    config = transformers.LlamaConfig(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    non_embedding = params - model.model.embed_tokens.weight.numel()
    assert flops_per_token(model, params, 256) == 6 * non_embedding + 12 * 3 * 4 * 16 * 256
