"""What the int8 dense kernel needs to know about a dot-product tensor intrinsic."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Int8Dot:
    """An int8 dot product registered as a tensor intrinsic: ``lanes`` int32 accumulators each add
    ``reduce`` products of one broadcast activation group and a ``[lanes, reduce]`` block of weights.

    ``activation`` is the dtype the kernel stages activations in for the instruction: ``uint8`` means it
    shifts int8 activations by +128 and folds ``-128 * row sums`` of the weights into a compile-time
    correction; ``int16`` sign-extends them.
    """

    family: str  # the ``int8_dot`` name of the target presets that use it
    intrin: str  # the registered TensorIntrin
    lanes: int
    reduce: int
    activation: str
    vector_registers: int  # of the instruction's width: bounds the accumulator tile
    instruction: str  # the LLVM intrinsic: (acc, a, b) -> acc if it accumulates, else (a, b) -> products
    operand: str  # its a/b vector dtype
    accumulates: bool

    @property
    def ops_per_instruction(self) -> int:
        """Integer ops (a multiply and an add per product) of one instruction."""
        return 2 * self.lanes * self.reduce

    @property
    def shift(self) -> int:
        return 128 if self.activation == "uint8" else 0
