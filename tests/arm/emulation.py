"""Running aarch64 code on this x86-64 machine: qemu-user with an aarch64 Python and the aarch64 wheels of TVM's
runtime that ``scripts/arm-emulation.sh`` sets up (in ``$INT8MT_ARM_ROOT``, default ``~/.cache/int8mt/arm``).
Tests that need it are skipped, with the command to run, where it is not set up."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(os.environ.get("INT8MT_ARM_ROOT", Path.home() / ".cache" / "int8mt" / "arm"))
SYSROOT, SITE = ROOT / "sysroot", ROOT / "site-packages"
PYTHON = SYSROOT / "usr" / "bin" / "python3.11"
QEMU, LINKER, OBJDUMP = "qemu-aarch64-static", "aarch64-linux-gnu-gcc", "aarch64-linux-gnu-objdump"
REPO = Path(__file__).resolve().parents[2]


def missing() -> list[str]:
    """What of the emulation set-up this machine lacks."""
    needed = [QEMU, LINKER, OBJDUMP]
    return ([tool for tool in needed if shutil.which(tool) is None]
            + [str(path) for path in (PYTHON, SITE / ".complete") if not path.exists()])


needs_emulation = pytest.mark.skipif(bool(missing()), reason=f"no aarch64 emulation here (lacks {', '.join(missing())}): "
                                                              "run `bash scripts/arm-emulation.sh`")
# qemu CPU models: with the dot product and i8mm (``max``), the dot product only, neither
CPUS = {"arm-i8mm": "max", "arm-dotprod": "neoverse-n1", "arm-neon": "cortex-a72"}


def install_int8mt(target: Path) -> Path:
    """int8mt installed into ``target`` as a board would get it (``pip install``; pure Python, so the host's pip
    builds it), without dependencies: the emulated Python takes those from :data:`SITE`."""
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--target", str(target), str(REPO)], check=True,
                   capture_output=True)
    return target


def _command(args: list[str], cpu: str, pythonpath: list[Path]) -> tuple[list[str], dict]:
    """The command line and environment of ``python3.11 ARGS`` on the emulated CPU ``cpu``."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "TVM_", "VIRTUAL_ENV"))}
    environ.update(PYTHONPATH=os.pathsep.join(map(str, [*pythonpath, SITE])), TVM_USE_RUNTIME_LIB="1")
    return [QEMU, "-cpu", cpu, "-L", str(SYSROOT), str(PYTHON), *args], environ


def run_aarch64(args: list[str], cpu: str = "max", pythonpath: list[Path] = (),
                timeout: float = 600) -> subprocess.CompletedProcess:
    """``python3.11 ARGS`` on an emulated aarch64 CPU ``cpu`` (a qemu model), TVM's runtime library only; run in
    :data:`ROOT`, so that ``-m int8mt`` finds the installed package, not the repository's sources."""
    command, environ = _command(args, cpu, pythonpath)
    return subprocess.run(command, env=environ, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def start_aarch64(args: list[str], cpu: str = "max") -> subprocess.Popen:
    """:func:`run_aarch64` in the background (a server)."""
    command, environ = _command(args, cpu, [])
    return subprocess.Popen(command, env=environ, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def count_instructions(library: Path, mnemonics: tuple[str, ...]) -> dict[str, int]:
    """How many times each of ``mnemonics`` occurs in the disassembly of ``library``."""
    listing = subprocess.run([OBJDUMP, "-d", str(library)], check=True, capture_output=True, text=True).stdout
    counts = dict.fromkeys(mnemonics, 0)
    for line in listing.splitlines():
        fields = line.split("\t")
        if len(fields) >= 3 and fields[2].strip() in counts:
            counts[fields[2].strip()] += 1
    return counts
