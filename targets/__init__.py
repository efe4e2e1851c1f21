"""Named target presets (data) and host CPU feature detection."""
from .presets import PRESETS, TargetPreset, get_preset, host_features, missing_features

__all__ = ["PRESETS", "TargetPreset", "get_preset", "host_features", "missing_features"]
