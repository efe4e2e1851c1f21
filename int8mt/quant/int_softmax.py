"""Integer-only softmax (I-BERT, Kim et al. 2021): attention scores in int32 with a compile-time scale ->
probabilities as integers with :data:`PROB_BITS` fractional bits, with no float op on activations.

``exp`` of ``d = q - max(q) <= 0`` is split as ``exp(p) * 2**-z`` with ``d = p - z * ln2`` and
``p`` in ``(-ln2, 0]``; ``exp(p)`` is the second-order polynomial ``a (p + b)**2 + c``, evaluated on the
integer grid of the scores (``q_b = floor(b / S)``, ``q_c = floor(c / (a S**2))``), and the ``2**-z`` is a
right shift. Scores on a grid coarser than :data:`FINE_SCALE` are first shifted left onto a finer one,
so that the floors of ``ln2 / S`` and ``b / S`` cost little accuracy. Normalisation divides once per row: ``prob = e * floor(2**40 / sum(e)) >> (40 - PROB_BITS)``.
An additive float bias (the padding mask) joins the scores on their grid, saturated at -2**30, so masked
keys get probability 0. The compiled graph (``ScalePropagation(integer_softmax=True)``) and this NumPy
version compute the same integers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PROB_BITS = 15        # probabilities leave as int32 in [0, 2**15] with scale 2**-15
NORM_BITS = 40        # precision of the per-row reciprocal 2**40 // sum
EXP_BITS = 16         # the polynomial's largest value is shifted down to below 2**16
BIAS_FLOOR = -2 ** 30  # a masked score: exp underflows to 0
FINE_SCALE = 5e-4     # the polynomial runs on a grid at least this fine (error of 1e-3 at most)
A, B, C = 0.3585, 1.353, 0.344  # I-BERT's fit of exp on (-ln2, 0]


@dataclass(frozen=True)
class IntSoftmax:
    """The integer constants of the softmax of scores with scale ``scale``."""

    ln2: int      # floor(ln2 / S') on the fine grid S' = S / 2**upshift
    b: int        # floor(b / S')
    c: int        # floor(c / (a S'^2))
    upshift: int  # scores shifted left by this onto the fine grid
    shift: int    # right shift bringing the polynomial's maximum (b^2 + c) below 2**EXP_BITS
    inv_scale: float  # 1 / S, for a float bias entering the scores' grid

    @classmethod
    def for_scale(cls, scale: float) -> "IntSoftmax":
        if not 0 < scale < 1:
            raise ValueError(f"integer softmax needs a score scale in (0, 1), not {scale}")
        upshift = max(0, math.ceil(math.log2(scale / FINE_SCALE)))
        fine = scale / 2 ** upshift
        b, c = math.floor(B / fine), math.floor(C / (A * fine * fine))
        peak = b * b + c
        return cls(math.floor(math.log(2) / fine), b, c, upshift, max(0, peak.bit_length() - EXP_BITS), 1.0 / scale)

    def bias_to_grid(self, bias: np.ndarray) -> np.ndarray:
        """A float additive bias on the scores' integer grid, saturated to [-2**30, 2**30]."""
        scaled = np.round(bias.astype(np.float32) * np.float32(self.inv_scale))
        return np.clip(scaled, BIAS_FLOOR, -BIAS_FLOOR).astype(np.int32)

    def __call__(self, q: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
        """int32 scores [..., S] (plus an optional float bias) -> int32 probabilities, scale 2**-PROB_BITS."""
        q = q.astype(np.int32)
        if bias is not None:
            q = q + self.bias_to_grid(bias)
        d = (q - q.max(-1, keepdims=True)).astype(np.int64) << self.upshift
        z = -d // self.ln2
        p = d + z * self.ln2
        e = ((p + self.b) ** 2 + self.c) >> np.minimum(z + self.shift, 62)
        recip = (np.int64(1) << NORM_BITS) // e.sum(-1, keepdims=True)
        return ((e * recip + (np.int64(1) << (NORM_BITS - PROB_BITS - 1))) >> (NORM_BITS - PROB_BITS)).astype(np.int32)
