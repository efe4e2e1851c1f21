"""Linking a bundle's ``.so`` for another CPU architecture than this machine's (an aarch64 bundle on x86-64, or
the reverse) with the GNU cross compiler of that architecture."""
from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable

import tvm.support.cc

from int8mt.errors import UserError
from int8mt.targets import TargetPreset, host_arch

# architecture -> (the GNU cross compiler that links for it, the Debian packages that bring it and its C library)
CROSS_COMPILERS = {
    "aarch64": ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu libc6-dev-arm64-cross"),
    "x86_64": ("x86_64-linux-gnu-gcc", "gcc-x86-64-linux-gnu libc6-dev-amd64-cross"),
}


def library_linker(preset: TargetPreset) -> Callable | None:
    """The ``fcompile`` of ``export_library`` for ``preset``'s code: None (the host's compiler) for this machine's
    architecture, else its cross compiler, checked to exist and to find its C library's start files."""
    if preset.arch == host_arch():
        return None
    compiler, packages = CROSS_COMPILERS[preset.arch]
    hint = (f"compiling for {preset.name} ({preset.arch}) on this {host_arch()} machine links the library with "
            f"{compiler}; install it (Debian/Ubuntu: apt-get install {packages}; or run scripts/arm-emulation.sh)")
    if shutil.which(compiler) is None:
        raise UserError(f"{compiler} was not found: {hint}")
    crti = subprocess.run([compiler, "-print-file-name=crti.o"], capture_output=True, text=True).stdout.strip()
    if crti in ("", "crti.o"):  # gcc prints the bare name when it cannot find the file
        raise UserError(f"{compiler} has no C library to link against: {hint}")
    return tvm.support.cc.cross_compiler(compiler)
