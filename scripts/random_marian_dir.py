"""A Hugging Face Marian (OPUS-MT layout) directory with random weights and SentencePiece models trained on
Multi30k, of any size: the input of the fixed-work comparison with CTranslate2, where only the model's shape
matters. The same builder the tests use (``tests/marian_dirs.py``).

    python scripts/random_marian_dir.py OUT --d-model 512 --layers 6 --heads 8 --ffn 2048 --pieces 8000
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.marian_dirs import build_marian_dir  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=6, help="encoder and decoder layers each")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--pieces", type=int, default=8000, help="SentencePiece pieces per language (shared vocabulary)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    build_marian_dir(a.out, "shared", a.seed, a.d_model, a.layers, a.heads, a.ffn, a.pieces)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
