"""Load a Hugging Face ``MarianMTModel`` directory (``config.json`` + ``model.safetensors`` or
``pytorch_model.bin``) into our Transformer. Reads the files directly: ``transformers`` is not needed.

Supported: shared or separate source/target embeddings (``share_encoder_decoder_embeddings``), a tied or
separate output projection (``tie_word_embeddings``), ``final_logits_bias``, any vocabulary sizes, both
``scale_embedding`` settings, relu/gelu/swish, and the same head count and FFN size in encoder and decoder.
Layers are post-norm, Marian's layout: ``transformers`` runs them so whatever a config's ``normalize_before``
says, and so do we (its converter refuses pre-norm Marian models).
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
_IGNORED = re.compile(r"^(encoder|decoder)\.embed_positions\.weight$")  # sinusoids, computed


def marian_model_config(hf: dict) -> ModelConfig:
    def require(cond: bool, what: str) -> None:
        if not cond:
            raise UserError(f"unsupported MarianConfig: {what}")

    require(hf.get("model_type", "marian") == "marian", f"model_type is {hf.get('model_type')!r}, expected 'marian'")
    shared = bool(hf.get("share_encoder_decoder_embeddings", True))
    target_vocab = hf.get("decoder_vocab_size") or hf["vocab_size"]
    require(not shared or target_vocab == hf["vocab_size"],
            f"shared embeddings with vocab_size {hf['vocab_size']} but decoder_vocab_size {target_vocab}")
    require(hf["encoder_attention_heads"] == hf["decoder_attention_heads"], "different encoder/decoder head counts")
    require(hf["encoder_ffn_dim"] == hf["decoder_ffn_dim"], "different encoder/decoder FFN sizes")
    act = hf.get("activation_function", "swish")
    require(act in _ACTIVATIONS, f"activation {act!r}")
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["d_model"], encoder_layers=hf["encoder_layers"],
        decoder_layers=hf["decoder_layers"], heads=hf["encoder_attention_heads"], ffn_dim=hf["encoder_ffn_dim"],
        activation=_ACTIVATIONS[act], max_positions=hf["max_position_embeddings"], dropout=0.0,
        scale_embedding=hf.get("scale_embedding", True), pad_id=hf["pad_token_id"], eos_id=hf["eos_token_id"],
        decoder_start_id=hf.get("decoder_start_token_id", hf["pad_token_id"]), shared_embeddings=shared,
        target_vocab_size=None if shared else target_vocab, tied_output=bool(hf.get("tie_word_embeddings", True)),
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


def _tables(raw: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our embedding and output tables from the file's names (a tied table is saved under any one of its
    names, depending on the exporter); the names used are removed from ``raw``."""
    def take(*names: str) -> torch.Tensor:
        found = [raw.pop(n) for n in names if n in raw]
        if not found:
            raise UserError(f"MarianMT weights lack {' or '.join(names)}")
        return found[0]

    if cfg.shared_embeddings:
        names = ["shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"]
        source = target = take(*names, *(["lm_head.weight"] if cfg.tied_output else []))
        state = {"embed_tokens.weight": source}
    else:
        source, target = take("encoder.embed_tokens.weight"), take("decoder.embed_tokens.weight", "shared.weight")
        state = {"embed_tokens.weight": source, "decoder_embed_tokens.weight": target}
    state["lm_head.weight"] = target if cfg.tied_output else take("lm_head.weight")
    for name in ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"):
        raw.pop(name, None)  # other names of a tied table
    return state


def read_marian_config(model_dir: Path | str) -> ModelConfig:
    """Our model config of a MarianMT directory, from its ``config.json``; a missing, unreadable or incomplete
    file raises a UserError naming it."""
    model_dir = Path(model_dir)
    try:
        hf = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {model_dir / 'config.json'}: {err}") from None
    try:
        return marian_model_config(hf)
    except KeyError as err:
        raise UserError(f"{model_dir / 'config.json'} lacks {err}, which a MarianConfig has") from None


def load_marian(model_dir: Path | str) -> Transformer:
    """Build our Transformer from a MarianMT directory; every weight must find its place."""
    model_dir = Path(model_dir)
    model = Transformer(read_marian_config(model_dir))
    raw = {k.removeprefix("model."): v for k, v in _read_weights(model_dir).items()}
    state = _tables(raw, model.cfg)
    for hf_name, tensor in raw.items():
        name = _our_name(hf_name)
        if name is not None:
            state[name] = tensor.reshape(-1) if name == "lm_head.bias" else tensor
    if "lm_head.bias" not in state:  # no final_logits_bias: zeros, as transformers starts it
        state["lm_head.bias"] = torch.zeros(model.cfg.output_vocab_size)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise UserError(f"MarianMT weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"MarianMT weights do not fit the config: {str(err).splitlines()[-1].strip()}") from None
    return model.eval()
