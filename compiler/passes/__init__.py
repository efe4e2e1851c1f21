"""int8mt's own Relax passes."""
from .pack_int8_matmul import PackInt8Matmul
from .scale_propagation import ScalePropagation
from .take_as_view import TakeAsView
from .tap_int_matmuls import TapIntMatmuls

__all__ = ["PackInt8Matmul", "ScalePropagation", "TakeAsView", "TapIntMatmuls"]
