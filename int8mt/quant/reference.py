"""NumPy integer reference of the quantized building blocks, written from the quantization scheme (not from
the compiled graph): the compiled integer graph must match it bit for bit."""
from __future__ import annotations

import numpy as np

from .fixed_point import apply_fixed_point, fixed_point


def quantize(x: np.ndarray, scale: float | np.ndarray, qmax: int) -> np.ndarray:
    """Symmetric quantization (``scale`` broadcasts to ``x``), round half to even, saturating at +-qmax."""
    return np.clip(np.round(x.astype(np.float32) / np.asarray(scale, np.float32)), -qmax, qmax).astype(np.int8)


def requantize(acc: np.ndarray, acc_scale: np.ndarray, out_scale: float, qmax: int) -> np.ndarray:
    """int32 values with (per-channel) ``acc_scale`` to int8 with ``out_scale``, by integer multiply-shift."""
    mult, shift = fixed_point(np.asarray(acc_scale, np.float64) / out_scale)
    return np.clip(apply_fixed_point(acc, mult, shift), -qmax, qmax).astype(np.int8)


def linear(x_q: np.ndarray, x_scale: float, w_q: np.ndarray, w_scale: np.ndarray,
           bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Integer linear layer: int8 x [.., K] and int8 w [N, K] (scales per row [N, 1]) -> (int32 acc, scale [N]);
    the bias is folded into the accumulator at the accumulator's scale."""
    acc = x_q.astype(np.int32) @ w_q.astype(np.int32).T
    scale = np.float64(x_scale) * w_scale.reshape(-1).astype(np.float64)
    if bias is not None:
        acc = acc + np.round(bias.astype(np.float64) / scale).astype(np.int32)
    return acc, scale


def ffn(x_q: np.ndarray, x_scale: float, fc1: tuple, hidden_scale: float, fc2: tuple, qmax: int
        ) -> tuple[np.ndarray, np.ndarray]:
    """fc2(requantize(relu(fc1(x)))) with ``fc = (w_q, w_scale, bias)``: int32 output and its scale."""
    acc, scale = linear(x_q, x_scale, *fc1)
    hidden = requantize(np.maximum(acc, 0), scale, hidden_scale, qmax)
    return linear(hidden, hidden_scale, *fc2)
