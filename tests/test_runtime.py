"""runtime.check_fsdp_wrapping and fsdp_unit_classes.

In-process on purpose: what is checked is a decision taken from the FSDP plugin and the model before
`accelerator.prepare`, and a model whose class lacks `_no_split_modules` would need a custom architecture
saved to disk and a 2-rank launch to reach the same line. The plugin is built exactly as
`enable_fsdp_on_cpu` builds it (from the FSDP_* variables `accelerate launch` sets)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dtrain.config import UserError
from dtrain.runtime import check_fsdp_wrapping, fsdp_unit_classes


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ff = torch.nn.Linear(4, 4)


class NoSplit(torch.nn.Module):
    """A model class with no `_no_split_modules` (e.g. a custom or remote-code architecture)."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([Block(), Block()])


class WithSplit(NoSplit):
    _no_split_modules = ["Block"]


def _fsdp_accelerator(monkeypatch, **env: str):
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    monkeypatch.setenv("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.delenv("FSDP_TRANSFORMER_CLS_TO_WRAP", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    return SimpleNamespace(distributed_type=DistributedType.FSDP, state=SimpleNamespace(fsdp_plugin=plugin))


def test_model_without_no_split_modules_is_refused(monkeypatch):
    acc = _fsdp_accelerator(monkeypatch)
    with pytest.raises(UserError) as err:
        check_fsdp_wrapping(acc, NoSplit())
    msg = str(err.value)
    assert "\n" not in msg and "NoSplit" in msg
    assert (
        "fsdp_transformer_layer_cls_to_wrap" in msg
        and "FSDP_TRANSFORMER_CLS_TO_WRAP" in msg
        and "ZeRO" in msg
    )


def test_layer_class_named_explicitly_or_from_no_split_modules_passes(monkeypatch):
    check_fsdp_wrapping(_fsdp_accelerator(monkeypatch), WithSplit())
    check_fsdp_wrapping(_fsdp_accelerator(monkeypatch, FSDP_TRANSFORMER_CLS_TO_WRAP="Block"), NoSplit())


def test_layer_class_the_model_lacks_is_refused(monkeypatch):
    acc = _fsdp_accelerator(monkeypatch, FSDP_TRANSFORMER_CLS_TO_WRAP="LlamaDecoderLayer")
    with pytest.raises(UserError, match="LlamaDecoderLayer.*NoSplit does not contain.*Block"):
        check_fsdp_wrapping(acc, NoSplit())


def test_other_strategies_and_policies_are_not_checked(monkeypatch):
    from accelerate.utils import DistributedType

    check_fsdp_wrapping(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU), NoSplit())
    acc = _fsdp_accelerator(monkeypatch, FSDP_AUTO_WRAP_POLICY="SIZE_BASED_WRAP")
    check_fsdp_wrapping(acc, NoSplit())


def test_fsdp_unit_classes_of_a_plain_model_is_empty():
    assert fsdp_unit_classes(WithSplit()) == []
