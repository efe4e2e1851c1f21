"""Quantization of the reference Transformer: every matmul in INT8 (or INT6), with activation ranges from
calibration, quantization-aware fine-tuning (learned ranges) or the run time."""
