"""Integer-only layer norm (after I-BERT, Kim et al. 2021) of a residual sum held as int64 on a fixed grid.

The residual sum enters on the grid :data:`INPUT_SCALE` (each addend is requantized onto it with an integer
multiplier and shift, or, for a float addend such as embeddings + positions, scaled by a power of two and
rounded). Then, per row of ``N`` values: ``mean = floor(sum / N)``, ``var = floor(sum((x - mean)^2) / N)
+ eps / INPUT_SCALE^2``, ``std = isqrt(var)`` by a fixed number of monotone Newton steps,
``y = floor((x - mean) * 2^NORM_BITS / std)`` and ``out = y * round(gamma * 2^GAMMA_BITS) + round(beta *
2^(NORM_BITS + GAMMA_BITS))``: an int64 tensor with the scale ``2^-(NORM_BITS + GAMMA_BITS)``. The compiled
graph (``ScalePropagation(integer_layer_norm=True)``) and this NumPy version compute the same integers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INPUT_BITS = 16       # residual sums on the grid 2**-16
INPUT_SCALE = 2.0 ** -INPUT_BITS
NORM_BITS = 12        # normalised values (x - mean) / std with 12 fractional bits
GAMMA_BITS = 12       # gamma with 12 fractional bits
OUTPUT_SCALE = 2.0 ** -(NORM_BITS + GAMMA_BITS)
SQRT_START = 1 << 31  # Newton's start, above the square root of any variance the grid can hold
SQRT_STEPS = 36       # enough steps to come down from SQRT_START to the square root of eps


@dataclass(frozen=True)
class IntLayerNorm:
    """The integer constants of one layer norm."""

    gamma: np.ndarray  # int64 [N]
    beta: np.ndarray   # int64 [N]
    eps: int           # eps on the squared input grid

    @classmethod
    def for_params(cls, weight: np.ndarray, bias: np.ndarray, eps: float) -> "IntLayerNorm":
        gamma = np.round(weight.astype(np.float64) * 2.0 ** GAMMA_BITS).astype(np.int64)
        beta = np.round(bias.astype(np.float64) / OUTPUT_SCALE).astype(np.int64)
        return cls(gamma, beta, max(1, round(eps / INPUT_SCALE ** 2)))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """int64 values on the grid INPUT_SCALE [..., N] -> int64 with scale OUTPUT_SCALE."""
        n = x.shape[-1]
        centred = x - x.sum(-1, keepdims=True) // n
        var = (centred * centred).sum(-1, keepdims=True) // n + self.eps
        y = (centred << NORM_BITS) // isqrt(var)
        return y * self.gamma + self.beta


def isqrt(v: np.ndarray) -> np.ndarray:
    """floor(sqrt(v)) of positive int64 values below 2**62: Newton's steps from above, never increasing."""
    r = np.full_like(v, SQRT_START)
    for _ in range(SQRT_STEPS):
        r = np.minimum(r, (r + v // r) >> 1)
    return r
