"""Tensor intrinsics of int8mt (description/implementation pairs registered under ``int8mt_`` names)."""
