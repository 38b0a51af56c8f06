"""Users' own models on every profile: the architecture matrix.

Each family is a tiny model with random weights, saved with `save_pretrained` next to a locally trained
byte-level BPE tokenizer and loaded back by path (no network). Every profile trains Llama (untied head,
GQA) and GPT-2 (tied embeddings, no pad token); single, ddp and fsdp also train Qwen2 (tied) and GPT-NeoX
(decoder layer class GPTNeoXLayer). Each (family, profile) runs once per module and several tests read it.

Proved here: the first losses from a pretrained directory agree across profiles (1e-5 relative) and differ
from a random init of the same config (the weights were really loaded, ZeRO-3's zero.Init included); FSDP
wraps each family's own decoder layer class; `final/` reloads with plain transformers and gives the last
checkpoint's logits; tied embeddings stay one tensor through FSDP, ZeRO-3, save, resume and export; and a
tokenizer without a pad token still ends responses with a trained EOS.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import assert_ok, bpe_tokenizer, dtrain_launch, run_train, save_pretrained_dir, train_rows
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

# family -> (model class in transformers, its decoder layer class: the FSDP unit)
FAMILIES = {
    "llama": ("LlamaForCausalLM", "LlamaDecoderLayer"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2DecoderLayer"),
    "gpt2": ("GPT2LMHeadModel", "GPT2Block"),
    "gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXLayer"),
}
TIED = {"gpt2", "qwen2"}
PROFILES = ["single", "ddp", "fsdp", "zero1", "zero2", "zero3"]
MATRIX = [(f, p) for f in ("llama", "gpt2") for p in PROFILES] + [
    (f, p) for f in ("qwen2", "gpt_neox") for p in ("single", "ddp", "fsdp")
]
MULTI = [(f, p) for f, p in MATRIX if p != "single"]
RESUMED = ["fsdp", "zero3"]  # GPT-2 (tied) resumed from a mid-run checkpoint under these
STEPS = 4
PER_RANK = 4  # 2 ranks x 4 = one process x 8
LOSS_RTOL = 1e-5
WORDS = [
    "apple",
    "house",
    "river",
    "stone",
    "cloud",
    "tiger",
    "lemon",
    "chair",
    "plant",
    "music",
    "ocean",
    "bread",
    "light",
    "green",
    "smile",
    "train",
]


def alpaca_rows() -> list[dict]:
    rows = []
    for i, w in enumerate(WORDS * 4):
        if i % 3 == 0:
            rows.append({"instruction": "Reverse the word.", "input": w, "output": w[::-1]})
        elif i % 3 == 1:
            rows.append({"instruction": "Write the word in capitals.", "input": w, "output": w.upper()})
        else:
            rows.append({"instruction": f"Repeat {w} twice.", "input": "", "output": f"{w} {w}"})
    return rows


def _run_args(
    data: Path, model: Path, out: Path, profile: str, save_steps: int, steps: int = STEPS
) -> list[str]:
    batch = PER_RANK * (2 if profile == "single" else 1)  # the same global batch everywhere
    return [
        "--model.name_or_path",
        str(model),
        "--data.path",
        str(data),
        "--data.template",
        "alpaca",
        "--output_dir",
        str(out),
        "--train.max_steps",
        str(steps),
        "--train.per_device_batch_size",
        str(batch),
        "--checkpoint.save_steps",
        str(save_steps),
        "--eval.steps",
        "0",
        "--eval.num_generate",
        "0",
        "--log.every_steps",
        "1",
        "--log.progress_bar",
        "false",
        "--log.plots",  # the tests' recipes draw nothing (dtrain plot draws afterwards)
        "false",
        # strong enough that a parameter put in the wrong weight-decay group shows in the trained weights
        # (ZeRO-3's zero.Init partitions look 1-D: measured 5.5e-5 when they all lost their decay)
        "--optim.weight_decay",
        "0.1",
    ]


class Runs:
    """Each (family, profile, weights) trained once per module; a failure is kept and reported to every
    test that reads that run."""

    def __init__(self, root: Path):
        self.root = root
        self.data = root / "alpaca.jsonl"
        self.data.write_text("".join(json.dumps(r) + "\n" for r in alpaca_rows()))
        texts = [f"{r['instruction']} {r['input']} {r['output']}" for r in alpaca_rows()]
        texts.append("### Instruction:\n\n### Input:\n\n### Response:\n")
        self.models: dict[tuple[str, str], Path] = {}
        for family in FAMILIES:
            tok = bpe_tokenizer(texts, pad=family != "gpt2")  # GPT-2 ships no pad token
            self.models[family, "pretrained"] = save_pretrained_dir(
                root / "models" / family, family, tok, seed=0
            )
            # the same config and tokenizer, other weights
            self.models[family, "random"] = save_pretrained_dir(
                root / "models" / f"{family}-other", family, tok, seed=1
            )
        self.done: dict[tuple, tuple[Path, object]] = {}

    def get(self, family: str, profile: str, weights: str = "pretrained") -> Path:
        key = (family, profile, weights)
        if key not in self.done:
            out = self.root / "runs" / "-".join(key)
            save_steps = 2 if family == "gpt2" and profile in RESUMED else 0  # 0: at the end only
            steps = STEPS if weights == "pretrained" else 1
            args = _run_args(self.data, self.models[family, weights], out, profile, save_steps, steps)
            proc = run_train(args) if profile == "single" else dtrain_launch(profile, args)
            self.done[key] = (out, proc)
        out, proc = self.done[key]
        assert_ok(proc)
        return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("architectures"))


def test_families_are_in_the_installed_transformers():
    import transformers

    for family, (model_class, layer_class) in FAMILIES.items():
        cls = getattr(transformers, model_class)
        assert layer_class in cls._no_split_modules, (family, cls._no_split_modules)


@pytest.mark.parametrize(("family", "profile"), MATRIX)
def test_trains_from_a_pretrained_directory(runs, family, profile):
    out = runs.get(family, profile)
    info = json.loads((out / "run_info.json").read_text())
    dist = info["distributed"]
    expected = {"single": "NO", "ddp": "MULTI_CPU", "fsdp": "FSDP"}.get(profile, "DEEPSPEED")
    assert dist["type"].endswith(expected) and dist["num_processes"] == (1 if profile == "single" else 2)
    # the whole model is counted under every profile (ZeRO-3 partitions report 0 local elements)
    from transformers import AutoModelForCausalLM

    pretrained = AutoModelForCausalLM.from_pretrained(runs.models[family, "pretrained"])
    assert info["model_parameters"] == sum(p.numel() for p in pretrained.parameters())
    if profile == "fsdp":  # one unit per decoder layer of this family, every parameter a shard
        assert FAMILIES[family][1] in dist["fsdp_units"], dist
        sharded, total = map(int, dist["sharded_parameters"].split("/"))
        assert sharded == total > 0, dist
    else:
        assert dist.get("fsdp_units") == []
    rows = train_rows(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


@pytest.mark.parametrize(("family", "profile"), MULTI)
def test_profile_agrees_with_one_process(runs, family, profile):
    """Same pretrained weights, global batch and seed: the same losses and the same trained weights."""
    ref, got = train_rows(runs.get(family, "single")), train_rows(runs.get(family, profile))
    assert got[0]["loss"] == pytest.approx(ref[0]["loss"], rel=LOSS_RTOL), (family, profile)
    for a, b in zip(ref, got, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_RTOL), (family, profile, a["step"])
    wa = load_file(runs.get(family, "single") / "final" / "model.safetensors")
    wb = load_file(runs.get(family, profile) / "final" / "model.safetensors")
    assert sorted(wa) == sorted(wb)
    worst = max(((wa[k] - wb[k]).abs().max().item(), k) for k in wa)
    assert worst[0] <= 1e-5, (family, profile, worst)  # measured: 1.1e-6 or less


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_pretrained_weights_are_really_loaded(runs, family):
    """A random init of the same config starts from another loss; since every profile's first loss equals
    one process's (above), every profile, ZeRO-3's zero.Init included, loaded the pretrained weights."""
    loaded = train_rows(runs.get(family, "single"))[0]["loss"]
    other = train_rows(runs.get(family, "single", "random"))[0]["loss"]
    assert abs(loaded - other) > 10 * LOSS_RTOL * loaded, (loaded, other)  # measured: 2.4e-3, 3.9e-3 relative


def _last_checkpoint(out: Path) -> Path:
    return out / "checkpoints" / f"step-{STEPS:08d}"


def _checkpoint_model(ckpt: Path):
    """The last checkpoint's weights in a model built from its own hf/config.json, independently of the
    export code (from_config + load_state_dict)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from dtrain.export import full_state_dict

    weights = full_state_dict(ckpt)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ckpt / "hf"))
    result = model.load_state_dict(weights, strict=False)
    assert not result.unexpected_keys, result
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    assert set(result.missing_keys) <= tied, result
    model.tie_weights()
    return model.eval(), weights


@pytest.mark.parametrize(("family", "profile"), MATRIX)
def test_final_reloads_with_the_last_checkpoints_logits(runs, family, profile):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = runs.get(family, profile)
    final = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    AutoTokenizer.from_pretrained(out / "final")
    ref, weights = _checkpoint_model(_last_checkpoint(out))
    ids = torch.tensor([[0, 5, 17, 42, 100, 7, 250, 3]])
    with torch.no_grad():
        a, b = final(ids).logits, ref(ids).logits
    assert (a - b).abs().max().item() <= 1e-5, (family, profile)
    # trained: the weights moved away from the pretrained ones
    start = AutoModelForCausalLM.from_pretrained(runs.models[family, "pretrained"])
    emb = final.get_input_embeddings().weight
    assert not torch.allclose(emb, start.get_input_embeddings().weight)
    if family in TIED:  # one tensor, equal to the checkpoint's trained weight
        assert final.get_output_embeddings().weight.data_ptr() == emb.data_ptr()
        key = next(k for k in weights if k.endswith(("wte.weight", "embed_tokens.weight")))
        assert torch.equal(emb, weights[key])
        if "lm_head.weight" in weights:
            assert torch.equal(weights["lm_head.weight"], weights[key])
    else:
        assert final.get_output_embeddings().weight.data_ptr() != emb.data_ptr()


@pytest.mark.parametrize("profile", RESUMED)
def test_tied_gpt2_resumes_exactly(runs, profile, tmp_path):
    straight = runs.get("gpt2", profile)
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step-00000002", resumed / "checkpoints" / "step-00000002")
    args = _run_args(runs.data, runs.models["gpt2", "pretrained"], resumed, profile, save_steps=2)
    assert_ok(dtrain_launch(profile, args))
    before = {r["step"]: r["loss"] for r in train_rows(straight)}
    after = {r["step"]: r["loss"] for r in train_rows(resumed)}
    assert sorted(after) == [3, 4]
    assert all(abs(after[s] - before[s]) <= 1e-6 * before[s] for s in after), (before, after)

    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(straight / "final")
    b = AutoModelForCausalLM.from_pretrained(resumed / "final")
    assert b.get_output_embeddings().weight.data_ptr() == b.get_input_embeddings().weight.data_ptr()
    sa, sb = a.state_dict(), b.state_dict()
    assert max((sa[k] - sb[k]).abs().max().item() for k in sa) <= 1e-6


def test_without_pad_token_eos_ends_responses_and_is_trained(runs):
    """GPT-2 ships no pad token; dtrain pads with EOS. The EOS that ends a response must still be a
    target, and only the padding positions are masked."""
    from transformers import AutoTokenizer

    from dtrain.config import DataConfig, ModelConfig
    from dtrain.data import IGNORE_INDEX, Collator, encode
    from dtrain.modeling import build_tokenizer

    path = runs.models["gpt2", "pretrained"]
    assert AutoTokenizer.from_pretrained(path).pad_token is None
    tok = build_tokenizer(ModelConfig(name_or_path=str(path)))
    eos = tok.eos_token_id
    assert eos is not None and tok.pad_token_id == eos

    cfg = DataConfig(template="alpaca")
    long, short = (encode(r, tok, cfg) for r in alpaca_rows()[:2])
    for row in (long, short):
        assert row["input_ids"][-1] == eos and row["labels"][-1] == eos  # ends with EOS, trained on
        assert IGNORE_INDEX in row["labels"]  # the prompt is masked
    if len(short["input_ids"]) > len(long["input_ids"]):
        long, short = short, long
    assert len(short["input_ids"]) < len(long["input_ids"])
    batch = Collator(tok.pad_token_id)([long, short])
    n = len(short["input_ids"])
    pad = batch["attention_mask"] == 0
    assert pad.any() and torch.equal(pad[1, n:], torch.ones_like(pad[1, n:]))
    assert (batch["input_ids"][pad] == tok.pad_token_id).all()
    assert (batch["labels"][pad] == IGNORE_INDEX).all()  # padding never counts
    assert batch["labels"][1, :n].tolist() == short["labels"]  # the real EOS keeps its label
    assert batch["labels"][0].tolist() == long["labels"]
    assert batch["labels"][1, n - 1].item() == eos
