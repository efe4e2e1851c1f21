"""A model directory: ours (``config.json``, ``model.safetensors``, the tokenizer ``spm.model``), or a Hugging
Face Marian / OPUS-MT one (``config.json`` with ``model_type: marian``, ``model.safetensors`` or
``pytorch_model.bin``, ``source.spm``, ``target.spm``, ``vocab.json``)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from ..errors import UserError
from .config import ModelConfig
from .transformer import Transformer

CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "config.json", "model.safetensors", "spm.model"


def save_model_dir(model: Transformer, out_dir: Path, tokenizer_file: Path | None = None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).write_text(json.dumps(model.cfg.to_dict(), indent=2) + "\n")
    save_model(model, str(out_dir / WEIGHTS_FILE))
    if tokenizer_file is not None and Path(tokenizer_file).resolve() != (out_dir / TOKENIZER_FILE).resolve():
        shutil.copyfile(tokenizer_file, out_dir / TOKENIZER_FILE)


def is_marian_dir(model_dir: Path) -> bool:
    """True for a Hugging Face Marian directory (its ``config.json`` says ``model_type: marian``)."""
    try:
        config = json.loads((Path(model_dir) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and config.get("model_type") == "marian"


def check_model_dir(model_dir: Path) -> None:
    """Raise a UserError naming the file if ``model_dir`` lacks the config or the weights."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"model directory {model_dir} {'is a file' if model_dir.exists() else 'does not exist'}")
    if is_marian_dir(model_dir):
        from .converters.marian import check_marian_dir

        check_marian_dir(model_dir)
        return
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (model_dir / name).is_file():
            raise UserError(f"{model_dir} is not a model directory: {name} is missing (an int8mt model needs "
                            f"{CONFIG_FILE} and {WEIGHTS_FILE}; a Hugging Face Marian one a {CONFIG_FILE} with "
                            "model_type marian)")


def model_config(model_dir: Path) -> ModelConfig:
    """The architecture of a model directory (ours or Marian), read from its config alone; a missing or damaged
    file raises a UserError naming it."""
    model_dir = Path(model_dir)
    check_model_dir(model_dir)
    if is_marian_dir(model_dir):
        from .converters.marian import read_marian_config

        return read_marian_config(model_dir)
    return ModelConfig.load(model_dir / CONFIG_FILE)


def load_model_dir(model_dir: Path) -> Transformer:
    """Load a model directory (ours or Marian) in eval mode; a missing or damaged file raises a UserError
    naming it."""
    model_dir = Path(model_dir)
    check_model_dir(model_dir)
    if is_marian_dir(model_dir):
        from .converters.marian import load_marian

        return load_marian(model_dir)
    model = Transformer(ModelConfig.load(model_dir / CONFIG_FILE))
    try:
        load_model(model, str(model_dir / WEIGHTS_FILE))
    except (SafetensorError, RuntimeError, OSError) as err:
        raise UserError(f"cannot load {model_dir / WEIGHTS_FILE}: {err}") from None
    return model.eval()


def average_state_dicts(paths: list[Path]) -> dict[str, torch.Tensor]:
    """Element-wise mean of several checkpoints' weights (checkpoint averaging)."""
    states = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
    return {k: sum(s[k] for s in states) / len(states) for k in states[0]}
