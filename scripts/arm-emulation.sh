#!/usr/bin/env bash
# Set up what the ARM (aarch64) tests need on an x86-64 Debian/Ubuntu machine, idempotently:
#   - qemu-user (runs aarch64 programs), the aarch64 cross compiler and binutils (links and disassembles bundles);
#   - an aarch64 Python 3.11 extracted from Debian packages, and the aarch64 wheels of TVM, its FFI, NumPy and
#     SentencePiece beside it, cached in $INT8MT_ARM_ROOT (default ~/.cache/int8mt/arm), outside the repository.
# The tests find them there (tests/arm_emulation.py); without them the emulated tests are skipped.
# Usage: bash scripts/arm-emulation.sh        (as root, or with sudo, for apt-get)
set -euo pipefail

ROOT="${INT8MT_ARM_ROOT:-$HOME/.cache/int8mt/arm}"
SYSROOT="$ROOT/sysroot"
SITE="$ROOT/site-packages"
# int8mt's runtime dependencies (pyproject.toml), and what TVM's RPC tracker and server need
WHEELS=(apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1 "numpy>=1.26,<3" "sentencepiece>=0.2,<0.3"
        "sacrebleu>=2.4,<3" "PyYAML>=6,<7" "tqdm>=4.66,<5" psutil cloudpickle tornado)
PACKAGES=(qemu-user-static gcc-aarch64-linux-gnu libc6-dev-arm64-cross binutils-aarch64-linux-gnu mmdebstrap)

if ! command -v qemu-aarch64-static >/dev/null || ! command -v aarch64-linux-gnu-gcc >/dev/null \
    || ! command -v mmdebstrap >/dev/null || [ ! -e /usr/aarch64-linux-gnu/lib/crti.o ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
fi

mkdir -p "$ROOT"
if [ ! -x "$SYSROOT/usr/bin/python3.11" ]; then
  rm -rf "$SYSROOT.partial"
  mmdebstrap --quiet --variant=extract --arch=arm64 \
    --include=python3.11-minimal,libpython3.11-stdlib,libstdc++6,libgcc-s1 bookworm "$SYSROOT.partial"
  rm -rf "$SYSROOT" && mv "$SYSROOT.partial" "$SYSROOT"
fi

if [ "$(cat "$SITE/.complete" 2>/dev/null)" != "${WHEELS[*]}" ]; then
  rm -rf "$SITE"
  python3 -m pip install -q --disable-pip-version-check --target "$SITE" --platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 \
    --platform manylinux_2_17_aarch64 --python-version 3.11 --implementation cp --abi cp311 \
    --only-binary=:all: "${WHEELS[@]}"
  rm -rf "$SITE/tvm/lib/libtvm_compiler.so" "$SITE/tvm/3rdparty"  # the runtime is all that runs there
  echo "${WHEELS[*]}" > "$SITE/.complete"
fi

echo "aarch64 emulation ready in $ROOT: qemu-aarch64-static -L $SYSROOT $SYSROOT/usr/bin/python3.11 (PYTHONPATH=$SITE)"
