"""Architecture of the reference Transformer (MarianMT-compatible: post-norm, sinusoidal positions, tied embeddings)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from int8mt.errors import UserError

ACTIVATIONS = ("relu", "gelu", "swish")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 8000
    d_model: int = 256
    encoder_layers: int = 3
    decoder_layers: int = 3
    heads: int = 4
    ffn_dim: int = 1024
    activation: str = "relu"
    max_positions: int = 256
    dropout: float = 0.1
    scale_embedding: bool = True
    pad_id: int = 0
    eos_id: int = 3
    decoder_start_id: int = 2
    shared_embeddings: bool = True        # one table for source and target tokens
    target_vocab_size: int | None = None  # the target side's vocabulary when not shared (None: vocab_size)
    tied_output: bool = True              # the logits projection is the target embedding table

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise UserError(f"activation {self.activation!r} is not supported; use one of {ACTIVATIONS}")
        if self.d_model % self.heads:
            raise UserError(f"d_model {self.d_model} is not divisible by heads {self.heads}")
        for name in ("vocab_size", "d_model", "encoder_layers", "decoder_layers", "heads", "ffn_dim", "max_positions"):
            if getattr(self, name) <= 0:
                raise UserError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.shared_embeddings and self.target_vocab_size not in (None, self.vocab_size):
            raise UserError(f"model config: shared embeddings need one vocabulary, but vocab_size is "
                            f"{self.vocab_size} and target_vocab_size {self.target_vocab_size}")
        if self.target_vocab_size is not None and self.target_vocab_size <= 0:
            raise UserError(f"model config: target_vocab_size must be positive, got {self.target_vocab_size}")
        for name in ("pad_id", "eos_id", "decoder_start_id"):
            if not 0 <= getattr(self, name) < min(self.vocab_size, self.output_vocab_size):
                raise UserError(f"model config: {name}={getattr(self, name)} is outside the vocabulary")

    @property
    def output_vocab_size(self) -> int:
        """Target tokens: the rows of the decoder's embedding table and the logits' width."""
        return self.vocab_size if self.target_vocab_size is None else self.target_vocab_size

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"model config: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)

    @classmethod
    def load(cls, path: Path) -> "ModelConfig":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, TypeError) as err:
            raise UserError(f"cannot read model config {path}: {err}") from None
