"""int8mt's own Relax passes."""
from .scale_propagation import ScalePropagation

__all__ = ["ScalePropagation"]
