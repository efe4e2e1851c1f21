"""The search's options (without NumPy, like loading a bundle: :mod:`int8mt.runtime.tensors`)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from int8mt.errors import UserError

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class SearchOptions:
    beam_size: int = 4
    length_penalty: float = 0.6
    max_length_a: float = 1.5
    max_length_b: int = 10
    min_length: int = 0  # tokens before end of sentence may be chosen (capped by the maximum length)

    def __post_init__(self) -> None:
        if self.beam_size < 1:
            raise UserError(f"beam size must be at least 1, got {self.beam_size}")
        for name in ("length_penalty", "max_length_a"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise UserError(f"{name} must be a finite number >= 0, got {value}")
        for name in ("max_length_b", "min_length"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")

    def max_length(self, source_length: int, limit: int) -> int:
        """The output limit of a sentence of ``source_length`` tokens (unpadded: batching never changes a result),
        at most ``limit``."""
        return max(1, min(int(self.max_length_a * source_length) + self.max_length_b, limit))

    def max_lengths(self, src: np.ndarray, pad_id: int, limit: int) -> list[int]:
        """:meth:`max_length` of each row of ``src`` [B, S] (padded with ``pad_id``)."""
        return [self.max_length(int(n), limit) for n in (src != pad_id).sum(1)]
