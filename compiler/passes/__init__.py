"""int8mt's own Relax passes."""
from .pack_int8_matmul import PackInt8Matmul
from .scale_propagation import ScalePropagation

__all__ = ["PackInt8Matmul", "ScalePropagation"]
