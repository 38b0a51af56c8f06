"""dtrain.optim: parameter groups, every optimizer takes a real step, learning-rate schedules."""

from __future__ import annotations

import math

import pytest
import torch

from dtrain.config import DataConfig, EvalConfig, ModelConfig, OptimConfig
from dtrain.modeling import build_model
from dtrain.optim import build_optimizer, build_scheduler, param_groups, warmup_steps
from dtrain.tasks import build_char_tokenizer

TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def tiny_model(tok, **overrides):
    torch.manual_seed(0)
    return build_model(ModelConfig(**{**TINY, **overrides}), tok, DataConfig(), EvalConfig())


def untied_model(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    return model


def group_of(groups: list[dict], param: torch.Tensor) -> dict:
    matches = [g for g in groups if any(p is param for p in g["params"])]
    assert len(matches) == 1, f"parameter in {len(matches)} groups"
    return matches[0]


def assert_partition(model: torch.nn.Module, groups: list[dict]) -> None:
    """Every trainable parameter in exactly one group, nothing else in any group."""
    in_groups = [id(p) for g in groups for p in g["params"]]
    assert len(in_groups) == len(set(in_groups)), "a parameter appears twice"
    assert set(in_groups) == {id(p) for p in model.parameters() if p.requires_grad}


# --------------------------------------------------------------------------------------------
# Parameter groups
# --------------------------------------------------------------------------------------------


def test_param_groups_decay_only_matrices(tok):
    model = tiny_model(tok)
    cfg = OptimConfig(weight_decay=0.1)
    groups = param_groups(model, cfg)
    assert_partition(model, groups)
    one_d = 0
    for name, p in model.named_parameters():
        g = group_of(groups, p)
        if p.ndim == 1:
            one_d += 1
            assert g["weight_decay"] == 0.0, name
            assert g["name"].endswith("_no_decay")
        else:
            assert g["weight_decay"] == 0.1, name
        assert g["lr"] == cfg.lr
    assert one_d == 3  # two layer norms + the final norm
    names = {n for n, p in model.named_parameters() if p.ndim == 1}
    assert names == {
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.norm.weight",
    }


def test_param_groups_biases_are_not_decayed():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2))
    groups = param_groups(model, OptimConfig(weight_decay=0.5))
    assert_partition(model, groups)
    for name, p in model.named_parameters():
        expected = 0.5 if name.endswith("weight") and p.ndim == 2 else 0.0
        assert group_of(groups, p)["weight_decay"] == expected, name


def test_param_groups_read_the_real_shape_of_zero3_partitions():
    """Under ZeRO-3 `zero.Init` every parameter is a flat 1-D partition and its real shape is `ds_shape`
    (DeepSpeed's attribute, set here by hand: a real partition needs a DeepSpeed process group; the
    architecture matrix trains real ones). Matrices must still be decayed, biases and norms not."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    for p in model.parameters():
        p.ds_shape = p.shape
        p.data = p.data.reshape(-1)  # what a partition looks like locally
    groups = param_groups(model, OptimConfig(weight_decay=0.5))
    assert group_of(groups, model[0].weight)["weight_decay"] == 0.5
    for p in (model[0].bias, model[1].weight, model[1].bias):
        assert group_of(groups, p)["weight_decay"] == 0.0


def test_tied_head_keeps_base_lr(tok):
    model = tiny_model(tok)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    groups = param_groups(model, OptimConfig(lr=1e-3, head_lr=5e-2))
    assert_partition(model, groups)
    assert all(g["lr"] == 1e-3 for g in groups)
    assert group_of(groups, model.get_input_embeddings().weight)["weight_decay"] == 0.01


def test_untied_head_gets_head_lr(tok):
    model = untied_model(tok)
    groups = param_groups(model, OptimConfig(lr=1e-3, head_lr=5e-2, weight_decay=0.2))
    assert_partition(model, groups)
    head = model.get_output_embeddings().weight
    head_group = group_of(groups, head)
    assert head_group["lr"] == 5e-2
    assert head_group["weight_decay"] == 0.2
    assert [p is head for p in head_group["params"]] == [True]  # nothing else at the head lr
    for name, p in model.named_parameters():
        if p is not head:
            assert group_of(groups, p)["lr"] == 1e-3, name
    assert group_of(groups, model.get_input_embeddings().weight)["lr"] == 1e-3


def test_untied_head_without_head_lr_uses_lr(tok):
    model = untied_model(tok)
    groups = param_groups(model, OptimConfig(lr=2e-3))
    assert_partition(model, groups)
    assert {g["lr"] for g in groups} == {2e-3}
    assert all(not g["name"].startswith("head") for g in groups)


def test_frozen_parameters_are_left_out(tok):
    model = tiny_model(tok)
    model.model.norm.weight.requires_grad_(False)
    groups = param_groups(model, OptimConfig())
    assert all(p is not model.model.norm.weight for g in groups for p in g["params"])
    assert_partition(model, groups)


# --------------------------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------------------------


def one_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, bool]:
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(4, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return {n: not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters()}


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("name", ["adamw", "adafactor", "sgd", "adamw_8bit", "paged_adamw_8bit"])
def test_build_optimizer_takes_a_step(tok, name):
    # intermediate 128 -> the MLP matrices have 128 * 32 = 4096 elements (bitsandbytes' 8-bit threshold)
    model = tiny_model(tok, intermediate_size=128)
    cfg = OptimConfig(name=name, lr=1e-2, weight_decay=0.05)
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    assert isinstance(optimizer, torch.optim.Optimizer)
    assert len(optimizer.param_groups) == 2
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0, 0.05}
    assert all(g["lr"] == 1e-2 for g in optimizer.param_groups)
    changed = one_step(model, optimizer)
    assert all(changed.values()), [n for n, c in changed.items() if not c]
    if name.endswith("8bit"):
        big = [p for p in model.parameters() if p.numel() >= 4096]
        small = [p for p in model.parameters() if p.numel() < 4096]
        assert big and small
        for p in big:
            assert optimizer.state[p]["state1"].dtype == torch.uint8
        for p in small:
            assert optimizer.state[p]["state1"].dtype == torch.float32


def test_sgd_uses_beta1_as_momentum(tok):
    optimizer = build_optimizer(tiny_model(tok), OptimConfig(name="sgd", beta1=0.7), torch.device("cpu"))
    assert isinstance(optimizer, torch.optim.SGD)
    assert all(g["momentum"] == 0.7 for g in optimizer.param_groups)


def test_adamw_uses_configured_betas_and_eps(tok):
    cfg = OptimConfig(beta1=0.8, beta2=0.99, eps=1e-6)
    optimizer = build_optimizer(tiny_model(tok), cfg, torch.device("cpu"))
    assert isinstance(optimizer, torch.optim.AdamW)
    for g in optimizer.param_groups:
        assert g["betas"] == (0.8, 0.99)
        assert g["eps"] == 1e-6


def test_head_lr_reaches_the_optimizer(tok):
    model = untied_model(tok)
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3, head_lr=7e-3), torch.device("cpu"))
    head = model.get_output_embeddings().weight
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == {"body": 1e-3, "body_no_decay": 1e-3, "head": 7e-3}
    assert [g for g in optimizer.param_groups if g["name"] == "head"][0]["params"][0] is head


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------

SCHEDULERS = ["linear", "cosine", "cosine_with_restarts", "constant_with_warmup", "wsd"]


def lr_curve(cfg: OptimConfig, max_steps: int) -> list[float]:
    """lr before optimizer step 0, 1, ..., max_steps (max_steps + 1 values)."""
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([param], lr=cfg.lr)
    scheduler = build_scheduler(optimizer, cfg, max_steps)
    out = []
    for _ in range(max_steps + 1):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def transformers_curve(cfg: OptimConfig, max_steps: int) -> list[float]:
    """The same schedule from transformers' own get_scheduler, as dtrain built it before: the oracle."""
    from transformers import get_scheduler

    warmup, name, extra = warmup_steps(cfg, max_steps), cfg.scheduler, {}
    if name == "cosine" and cfg.min_lr_ratio > 0:
        name, extra = "cosine_with_min_lr", {"min_lr_rate": cfg.min_lr_ratio}
    elif name == "cosine_with_restarts":
        extra = {"num_cycles": cfg.num_cycles}
    elif name == "wsd":
        decay = min(max(1, round(cfg.decay_fraction * max_steps)), max(1, max_steps - warmup))
        name = "warmup_stable_decay"
        extra = {
            "num_decay_steps": decay,
            "num_stable_steps": max(0, max_steps - warmup - decay),
            "min_lr_ratio": cfg.min_lr_ratio,
        }
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([param], lr=cfg.lr)
    scheduler = get_scheduler(
        name,
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=max_steps,
        scheduler_specific_kwargs=extra,
    )
    out = []
    for _ in range(max_steps + 1):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.filterwarnings("ignore:Both num_training_steps and num_stable_steps")
@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize(
    "settings",
    [
        {"warmup_steps": 0},
        {"warmup_steps": 7, "min_lr_ratio": 0.1, "num_cycles": 3},
        {"warmup_ratio": 0.3, "decay_fraction": 0.5},
        {"warmup_steps": 98, "min_lr_ratio": 0.25},
    ],
)
def test_every_schedule_equals_transformers_get_scheduler(name, settings):
    """dtrain writes transformers' formulas itself (importing them costs 2 s a process): bit for bit the same
    learning rate at every step, and a scheduler state either side can load."""
    cfg = OptimConfig(lr=0.7, scheduler=name, **settings)
    assert lr_curve(cfg, 100) == transformers_curve(cfg, 100)
    param = torch.nn.Parameter(torch.zeros(2))
    ours = build_scheduler(torch.optim.SGD([param], lr=0.7), cfg, 100)
    assert type(ours) is torch.optim.lr_scheduler.LambdaLR  # the class get_scheduler returns


@pytest.mark.filterwarnings("ignore:Both num_training_steps and num_stable_steps")
@pytest.mark.parametrize("name", SCHEDULERS)
def test_linear_warmup_to_peak(name):
    peak, warmup = 0.5, 10
    lrs = lr_curve(OptimConfig(lr=peak, scheduler=name, warmup_steps=warmup), 100)
    for step in range(warmup + 1):
        assert lrs[step] == pytest.approx(peak * step / warmup), step
    assert max(lrs) == pytest.approx(peak)
    assert all(lr <= peak + 1e-12 for lr in lrs)


def test_linear_decays_to_zero():
    lrs = lr_curve(OptimConfig(lr=1.0, scheduler="linear", warmup_steps=10), 100)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-9)
    assert lrs[55] == pytest.approx(0.5)  # halfway through the decay
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))


def test_constant_with_warmup_stays_at_peak():
    lrs = lr_curve(OptimConfig(lr=0.3, scheduler="constant_with_warmup", warmup_steps=5), 50)
    assert lrs[5:] == pytest.approx([0.3] * 46)


def test_cosine_ends_at_zero_by_default():
    lrs = lr_curve(OptimConfig(lr=1.0, scheduler="cosine", warmup_steps=10), 100)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-9)
    assert lrs[55] == pytest.approx(0.5)


def test_cosine_with_min_lr_ratio_ends_at_fraction_of_lr():
    lrs = lr_curve(OptimConfig(lr=2.0, scheduler="cosine", warmup_steps=10, min_lr_ratio=0.1), 100)
    assert lrs[-1] == pytest.approx(0.2)
    assert min(lrs[10:]) == pytest.approx(0.2)
    assert lrs[10] == pytest.approx(2.0)


def test_cosine_with_restarts_restarts_num_cycles_times():
    lrs = lr_curve(OptimConfig(lr=1.0, scheduler="cosine_with_restarts", warmup_steps=0, num_cycles=2), 20)
    assert lrs[0] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)  # the hard restart
    assert lrs[9] < 0.1
    assert lrs[5] == pytest.approx(0.5)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.filterwarnings("ignore:Both num_training_steps and num_stable_steps")
@pytest.mark.parametrize("min_lr_ratio", [0.0, 0.1])
def test_wsd_stable_then_decays_in_last_fraction(min_lr_ratio):
    peak, warmup, max_steps = 1.0, 10, 100
    cfg = OptimConfig(
        lr=peak, scheduler="wsd", warmup_steps=warmup, decay_fraction=0.2, min_lr_ratio=min_lr_ratio
    )
    lrs = lr_curve(cfg, max_steps)
    decay_start = max_steps - 20
    assert lrs[warmup : decay_start + 1] == pytest.approx([peak] * (decay_start - warmup + 1))
    tail = lrs[decay_start + 1 :]
    assert all(lr < peak for lr in tail)
    assert all(a > b for a, b in zip(tail, tail[1:], strict=False))  # strictly decreasing
    assert lrs[-1] == pytest.approx(min_lr_ratio * peak, abs=1e-9)


@pytest.mark.filterwarnings("ignore:Both num_training_steps and num_stable_steps")
def test_wsd_reaches_min_lr_at_max_steps_even_with_long_warmup():
    # a config parse_config accepts (warmup_steps < max_steps); decay = round(0.2 * 10) = 2 steps
    lrs = lr_curve(OptimConfig(lr=1.0, scheduler="wsd", warmup_steps=9, min_lr_ratio=0.0), 10)
    assert lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(0.0, abs=1e-9)


def test_warmup_steps_overrides_warmup_ratio():
    assert warmup_steps(OptimConfig(warmup_ratio=0.05), 100) == 5
    assert warmup_steps(OptimConfig(warmup_ratio=0.05), 30) == math.ceil(1.5)
    assert warmup_steps(OptimConfig(warmup_ratio=0.5, warmup_steps=3), 100) == 3
    assert warmup_steps(OptimConfig(warmup_ratio=0.5, warmup_steps=0), 100) == 0
    with_ratio = lr_curve(OptimConfig(lr=1.0, scheduler="constant_with_warmup", warmup_ratio=0.5), 20)
    with_steps = lr_curve(
        OptimConfig(lr=1.0, scheduler="constant_with_warmup", warmup_ratio=0.5, warmup_steps=2), 20
    )
    assert with_ratio[5] == pytest.approx(0.5) and with_ratio[10] == pytest.approx(1.0)
    assert with_steps[1] == pytest.approx(0.5) and with_steps[2] == pytest.approx(1.0)
    assert with_steps[5] == pytest.approx(1.0)


def test_scheduler_drives_every_param_group(tok):
    model = untied_model(tok)
    cfg = OptimConfig(lr=1e-3, head_lr=4e-3, scheduler="linear", warmup_steps=4)
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    scheduler = build_scheduler(optimizer, cfg, 20)
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["head"] == pytest.approx(2e-3)  # half-way through warmup, each group on its own peak
    assert lrs["body"] == pytest.approx(5e-4)
