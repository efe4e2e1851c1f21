"""int8mt: INT8 Transformer machine translation compiled with Apache TVM."""
__version__ = "0.1.0"
