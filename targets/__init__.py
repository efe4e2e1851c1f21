"""Named target presets (data) and host CPU feature detection."""
from .presets import (AUTO, PRESETS, TargetPreset, amx_permission, get_preset, host_arch, host_cpu_name,
                      host_features, missing_features, needs_amx, target_device)

__all__ = ["AUTO", "PRESETS", "TargetPreset", "amx_permission", "get_preset", "host_arch", "host_cpu_name",
           "host_features", "missing_features", "needs_amx", "target_device"]
