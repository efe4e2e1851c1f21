"""Named target presets (data) and host CPU feature detection."""
from .presets import (AUTO, PRESETS, TargetPreset, get_preset, host_arch, host_features, missing_features,
                      target_device)

__all__ = ["AUTO", "PRESETS", "TargetPreset", "get_preset", "host_arch", "host_features", "missing_features", "target_device"]
