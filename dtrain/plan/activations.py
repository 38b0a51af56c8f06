"""Activation memory, measured: the bytes a forward saves for backward, on fake tensors.

No textbook constant fits every family (measured per-layer coefficients range from 24 to 48 bytes per
token and hidden unit), so the planner runs the model itself: a copy of it with two decoder layers, built
under `FakeTensorMode` (tensors with shapes and dtypes but no storage: a 70B layer costs no memory), in the
run's compute dtype, attention kernel and gradient-checkpointing setting. `saved_tensors_hooks` sees every
tensor autograd keeps for backward; each storage is counted once, parameters never. The bytes are split
into the decoder layers' and the rest (embedding output, final norm), at two sequence lengths, and fitted
as `a*s + c*s^2` per sequence (the s^2 term: eager attention's probabilities, masks), so they scale to any
sequence length and micro-batch. With gradient checkpointing a layer saves only its input, and backward
recomputes one layer at a time: its full saved bytes are added once, as the recompute peak.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import ExitStack
from dataclasses import dataclass

import torch

MEASURE_LAYERS = 2  # decoder layers in the measured copy (per-layer bytes are their average)


@dataclass(frozen=True)
class Fit:
    """Saved bytes of one sequence as `linear * s + square * s^2`."""

    linear: float
    square: float

    def at(self, seq: int) -> float:
        return self.linear * seq + self.square * seq * seq

    @staticmethod
    def through(points: list[tuple[int, float]]) -> Fit:
        (s1, y1), (s2, y2) = points
        square = (y2 / s2 - y1 / s1) / (s2 - s1)
        square = max(square, 0.0)
        linear = max((y2 - square * s2 * s2) / s2, 0.0)
        return Fit(linear, square)


@dataclass(frozen=True)
class Activations:
    """Fitted saved bytes: the decoder's layers (per layer) and everything outside them."""

    layer: Fit
    outside: Fit
    layers: int
    how: str  # "measured (...)" or the fallback formula's name

    def saved(self, batch: int, seq: int) -> float:
        return batch * (self.outside.at(seq) + self.layers * self.layer.at(seq))

    def one_layer(self, batch: int, seq: int) -> float:
        return batch * self.layer.at(seq)


@dataclass(frozen=True)
class ActivationModel:
    """What a micro-batch of `batch` sequences of `seq` tokens keeps for backward, with or without
    gradient checkpointing (then plus the recompute peak of one layer)."""

    plain: Activations
    checkpointed: Activations

    def bytes(self, batch: int, seq: int, checkpointing: bool) -> float:
        if not checkpointing:
            return self.plain.saved(batch, seq)
        return self.checkpointed.saved(batch, seq) + self.plain.one_layer(batch, seq)


def measure(config, dtype: torch.dtype, seq: int) -> ActivationModel:
    """Measure at `seq` and `seq // 2` tokens (one sequence each), with and without checkpointing."""
    lengths = sorted({max(8, seq // 2), max(16, seq)})
    if len(lengths) == 1:
        lengths.append(lengths[0] * 2)
    try:
        small = reduced_config(config)
        found = {gc: [saved_by_scope(small, dtype, s, gc) for s in lengths] for gc in (False, True)}
    except Exception as exc:  # a forward fake tensors cannot run (data-dependent shapes): the formula
        reason = " ".join(str(exc).split())[:120]
        return formula(config, dtype, f"formula (fake-tensor forward failed: {reason})")
    layers = num_layers(config)
    how = f"measured on fake tensors ({MEASURE_LAYERS} layers, {lengths[0]} and {lengths[1]} tokens)"
    built = {}
    for gc, points in found.items():
        layer = Fit.through(
            [(s, inside / MEASURE_LAYERS) for s, (inside, _) in zip(lengths, points, strict=True)]
        )
        outside = Fit.through([(s, out) for s, (_, out) in zip(lengths, points, strict=True)])
        built[gc] = Activations(layer, outside, layers, how)
    return ActivationModel(built[False], built[True])


def num_layers(config) -> int:
    return int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0) or 1)


def reduced_config(config):
    """The same model with MEASURE_LAYERS decoder layers (per-layer lists such as `layer_types` cut to
    match, keeping the first layers' pattern)."""
    small = copy.deepcopy(config)
    small.num_hidden_layers = min(MEASURE_LAYERS, num_layers(config))
    for key in ("layer_types", "mlp_only_layers"):
        value = getattr(small, key, None)
        if isinstance(value, list) and len(value) > small.num_hidden_layers:
            setattr(small, key, value[: small.num_hidden_layers])
    return small


def saved_by_scope(config, dtype: torch.dtype, seq: int, checkpointing: bool) -> tuple[float, float]:
    """(bytes saved inside decoder layers, bytes saved outside them) by a training forward of the decoder
    (no head: the logits are the planner's own term) over one sequence of `seq` tokens, on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import AutoModelForCausalLM

    from dtrain.plan.model import decoder_layers

    with FakeTensorMode(allow_non_fake_inputs=True):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        if checkpointing:  # as dtrain.modeling.build_model turns it on (transformers renames it in v6)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        ids = torch.zeros(1, seq, dtype=torch.long)
        return count_saved(model, decoder_layers(model), lambda: model(input_ids=ids, use_cache=False))


def count_saved(model, layers, forward) -> tuple[float, float]:
    """Run `forward` and split the unique storages autograd saves into (inside `layers`, outside)."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    owner: dict[int, tuple[str, int]] = {}
    scope = ["outside"]

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in params and key not in owner:
            owner[key] = (scope[-1], storage.nbytes())
        return t

    def enter(*_):
        scope.append("inside")

    def leave(*_):
        scope.pop()

    with ExitStack() as stack:
        for layer in layers:
            stack.callback(layer.register_forward_pre_hook(enter).remove)
            stack.callback(layer.register_forward_hook(leave).remove)
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
        forward()
    inside = sum(n for where, n in owner.values() if where == "inside")
    outside = sum(n for where, n in owner.values() if where == "outside")
    return float(inside), float(outside)


def formula(config, dtype: torch.dtype, how: str) -> ActivationModel:
    """Korthikanti et al. (2022), 2-byte activations: s*h*(34 + 5*a*s/h) bytes per layer and sequence,
    scaled by the dtype; with checkpointing a layer keeps its input (2*s*h bytes)."""
    scale = torch.finfo(dtype).bits / 16
    h = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0))
    a = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 1))
    layers = num_layers(config)
    plain = Activations(Fit(34 * h * scale, 5 * a * scale), Fit(4 * h * scale, 0.0), layers, how)
    checkpointed = Activations(Fit(2 * h * scale, 0.0), Fit(4 * h * scale, 0.0), layers, how)
    return ActivationModel(plain, checkpointed)
