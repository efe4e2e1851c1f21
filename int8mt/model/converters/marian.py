"""Load a Hugging Face ``MarianMTModel`` directory (``config.json`` + ``model.safetensors`` or
``pytorch_model.bin``) into our Transformer. Reads the files directly: ``transformers`` is not needed.

Supported: shared source/target/output embeddings (``share_encoder_decoder_embeddings``), the same head
count and FFN size in encoder and decoder, post-norm layers (MarianMT's only layout).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from ...errors import UserError
from ..config import ModelConfig
from ..transformer import Transformer

_ACTIVATIONS = {"swish": "swish", "silu": "swish", "relu": "relu", "gelu": "gelu"}
_LAYER_RENAMES = (
    (r"^encoder\.layers\.(\d+)\.", r"encoder_layers.\1."),
    (r"^decoder\.layers\.(\d+)\.", r"decoder_layers.\1."),
    (r"\.encoder_attn_layer_norm\.", ".cross_attn_layer_norm."),
    (r"\.encoder_attn\.", ".cross_attn."),
    (r"\.(fc[12])\.", r".ffn.\1."),
)
_IGNORED = re.compile(r"^(encoder|decoder)\.(embed_positions\.weight|embed_tokens\.weight)$|^lm_head\.weight$")


def marian_model_config(hf: dict) -> ModelConfig:
    def require(cond: bool, what: str) -> None:
        if not cond:
            raise UserError(f"unsupported MarianConfig: {what}")

    require(hf.get("model_type", "marian") == "marian", f"model_type is {hf.get('model_type')!r}, expected 'marian'")
    require(hf.get("share_encoder_decoder_embeddings", True), "separate encoder/decoder embeddings")
    require(hf["encoder_attention_heads"] == hf["decoder_attention_heads"], "different encoder/decoder head counts")
    require(hf["encoder_ffn_dim"] == hf["decoder_ffn_dim"], "different encoder/decoder FFN sizes")
    act = hf.get("activation_function", "swish")
    require(act in _ACTIVATIONS, f"activation {act!r}")
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["d_model"], encoder_layers=hf["encoder_layers"],
        decoder_layers=hf["decoder_layers"], heads=hf["encoder_attention_heads"], ffn_dim=hf["encoder_ffn_dim"],
        activation=_ACTIVATIONS[act], max_positions=hf["max_position_embeddings"], dropout=0.0,
        scale_embedding=hf.get("scale_embedding", True), pad_id=hf["pad_token_id"], eos_id=hf["eos_token_id"],
        decoder_start_id=hf.get("decoder_start_token_id", hf["pad_token_id"]),
    )


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def check_marian_dir(model_dir: Path) -> None:
    """``model_dir`` has a config and weights (the tokenizer files are checked where they are read)."""
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir} is not a Marian directory: config.json is missing")
    if not any((model_dir / name).is_file() for name in WEIGHT_FILES):
        raise UserError(f"{model_dir} has neither model.safetensors nor pytorch_model.bin")


def _read_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    check_marian_dir(model_dir)
    path = next(model_dir / name for name in WEIGHT_FILES if (model_dir / name).is_file())
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (safetensors and torch raise many kinds for a damaged file)
        raise UserError(f"cannot load {path}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None


def _our_name(name: str) -> str | None:
    if name == "final_logits_bias":
        return "lm_head.bias"
    if _IGNORED.match(name):
        return None
    for pattern, repl in _LAYER_RENAMES:
        name = re.sub(pattern, repl, name)
    return name


def load_marian(model_dir: Path | str) -> Transformer:
    """Build our Transformer from a MarianMT directory; every weight must find its place."""
    model_dir = Path(model_dir)
    try:
        hf = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {model_dir / 'config.json'}: {err}") from None
    model = Transformer(marian_model_config(hf))
    raw = {k.removeprefix("model."): v for k, v in _read_weights(model_dir).items()}
    # The tied table is saved under one of its names, depending on the exporter.
    shared = next((raw.pop(k) for k in ("shared.weight", "encoder.embed_tokens.weight", "lm_head.weight") if k in raw),
                  None)
    state = {"embed_tokens.weight": shared, "lm_head.weight": shared} if shared is not None else {}
    for hf_name, tensor in raw.items():
        name = _our_name(hf_name)
        if name is not None:
            state[name] = tensor.reshape(-1) if name == "lm_head.bias" else tensor
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise UserError(f"MarianMT weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(state)
    return model.eval()
