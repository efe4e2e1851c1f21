"""Quantize/dequantize as PyTorch custom ops (kept intact by ``torch.export`` and mapped onto Relax by
:mod:`int8mt.compiler.quant_import`), and the straight-through fake quantization used in training.

Rounding is half to even (``torch.round``), as ``relax.op.quantize`` and NumPy's ``round``.
"""
from __future__ import annotations

import torch
from torch import Tensor

EPS = 1e-8  # smallest run-time scale: an all-zero row quantizes to zeros instead of dividing by zero


@torch.library.custom_op("int8mt::quantize", mutates_args=())
def quantize(x: Tensor, scale: Tensor, qmax: int) -> Tensor:
    """``clamp(round(x / scale), -qmax, qmax)`` as int8; ``scale`` broadcasts to ``x``."""
    return torch.clamp(torch.round(x / scale), -qmax, qmax).to(torch.int8)


@quantize.register_fake
def _(x: Tensor, scale: Tensor, qmax: int) -> Tensor:
    return torch.empty_like(x, dtype=torch.int8)


@torch.library.custom_op("int8mt::dequantize", mutates_args=())
def dequantize(q: Tensor, scale: Tensor) -> Tensor:
    """``q * scale`` in float32; ``scale`` broadcasts to ``q``."""
    return q.to(torch.float32) * scale


@dequantize.register_fake
def _(q: Tensor, scale: Tensor) -> Tensor:
    return q.new_empty(torch.broadcast_shapes(q.shape, scale.shape), dtype=torch.float32)


def dynamic_scale(x: Tensor, qmax: int, dim: int) -> Tensor:
    """Run-time scale: the largest magnitude along ``dim`` (kept as size 1) over ``qmax``."""
    return torch.clamp(x.abs().amax(dim, keepdim=True), min=EPS) / qmax


@torch.library.custom_op("int8mt::quantize_dynamic", mutates_args=())
def quantize_dynamic(x: Tensor, qmax: int, dim: int) -> tuple[Tensor, Tensor]:
    """Quantize with a scale computed from ``x`` itself, one per slice along ``dim``; returns (q, scale)."""
    scale = dynamic_scale(x, qmax, dim)
    return quantize(x, scale, qmax), scale


@quantize_dynamic.register_fake
def _(x: Tensor, qmax: int, dim: int) -> tuple[Tensor, Tensor]:
    shape = list(x.shape)
    shape[dim] = 1
    return torch.empty_like(x, dtype=torch.int8), x.new_empty(shape)


def fake_quant(x: Tensor, scale: Tensor, qmax: int) -> Tensor:
    """Quantize-dequantize with a straight-through estimator; ``scale`` receives LSQ's gradient."""
    xs = torch.clamp(x / scale, -qmax, qmax)
    return (xs + (torch.round(xs) - xs).detach()) * scale


def weight_scale(w: Tensor, qmax: int) -> Tensor:
    """Per-output-channel scale [N, 1] of a weight [N, K] from its largest magnitudes."""
    return torch.clamp(w.detach().abs().amax(1, keepdim=True), min=EPS) / qmax
