"""Save one of our model directories as a Hugging Face ``MarianMTModel`` directory (OPUS-MT layout), so other
engines (``transformers``, CTranslate2's converter) run the same weights. Needs ``transformers``.

Our layers are Marian's (post-norm, sinusoidal positions, the same projections), so the weights map one to
one; the SentencePiece model serves as both ``source.spm`` and ``target.spm`` and ``vocab.json`` keeps its ids.
"""
from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sentencepiece as spm
import torch

from ...errors import UserError
from ..checkpoint import TOKENIZER_FILE, is_marian_dir, load_model_dir
from ..transformer import Transformer

_EXPORT_RENAMES = (  # ours -> Marian's; the inverse of the loader's _LAYER_RENAMES
    (r"^encoder_layers\.(\d+)\.", r"encoder.layers.\1."),
    (r"^decoder_layers\.(\d+)\.", r"decoder.layers.\1."),
    (r"\.cross_attn_layer_norm\.", ".encoder_attn_layer_norm."),
    (r"\.cross_attn\.", ".encoder_attn."),
    (r"\.ffn\.(fc[12])\.", r".\1."),
)


@contextmanager
def quiet_marian_tokenizer() -> Iterator[None]:
    """``transformers.MarianTokenizer`` made or loaded without its notice that sacremoses (the text normalizer of
    its own pipeline) is missing: neither the export nor CTranslate2's converter normalizes text."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Recommended: pip install sacremoses", UserWarning)
        yield


def _hf_name(name: str) -> str:
    """The ``MarianMTModel`` name of one of our layer weights (the loader's renames, reversed)."""
    for pattern, repl in _EXPORT_RENAMES:
        name = re.sub(pattern, repl, name)
    return "model." + name


def _marian_config(model: Transformer) -> "transformers.MarianConfig":  # noqa: F821
    import transformers

    cfg = model.cfg
    return transformers.MarianConfig(
        vocab_size=cfg.vocab_size, decoder_vocab_size=cfg.output_vocab_size, d_model=cfg.d_model,
        encoder_layers=cfg.encoder_layers, decoder_layers=cfg.decoder_layers, encoder_attention_heads=cfg.heads,
        decoder_attention_heads=cfg.heads, encoder_ffn_dim=cfg.ffn_dim, decoder_ffn_dim=cfg.ffn_dim,
        activation_function=cfg.activation, max_position_embeddings=cfg.max_positions,
        scale_embedding=cfg.scale_embedding, pad_token_id=cfg.pad_id, eos_token_id=cfg.eos_id,
        forced_eos_token_id=cfg.eos_id, decoder_start_token_id=cfg.decoder_start_id,
        share_encoder_decoder_embeddings=cfg.shared_embeddings, tie_word_embeddings=cfg.tied_output,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)


def export_marian(model_dir: Path | str, out: Path | str) -> Path:
    """Write our model directory ``model_dir`` (config, weights, ``spm.model``) to ``out`` as a
    ``MarianMTModel`` directory with its tokenizer files; returns ``out``."""
    import transformers

    model_dir, out = Path(model_dir), Path(out)
    if is_marian_dir(model_dir):
        raise UserError(f"{model_dir} is already a Marian directory")
    spm_file = model_dir / TOKENIZER_FILE
    if not spm_file.is_file():
        raise UserError(f"{model_dir} has no {TOKENIZER_FILE}; exporting needs the model's SentencePiece model")
    model = load_model_dir(model_dir)
    if not model.cfg.shared_embeddings:
        raise UserError("exporting to Marian needs one vocabulary shared by source and target")
    hf_model = transformers.MarianMTModel(_marian_config(model)).eval()
    state = {"model.shared.weight": model.embed_tokens.weight, "final_logits_bias": model.lm_head.bias[None]}
    for name, tensor in model.state_dict().items():
        if name.startswith(("encoder_layers.", "decoder_layers.")):
            state[_hf_name(name)] = tensor
    if not model.cfg.tied_output:
        state["lm_head.weight"] = model.lm_head.weight
    with torch.no_grad():
        missing, unexpected = hf_model.load_state_dict(state, strict=False)
    left = [k for k in missing if "embed_positions" not in k and "embed_tokens" not in k and k != "lm_head.weight"]
    if left or unexpected:
        raise UserError(f"cannot map the weights to MarianMTModel: missing {left[:5]}, unexpected {unexpected[:5]}")
    out.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(out)
    sp = spm.SentencePieceProcessor(model_file=str(spm_file))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    with quiet_marian_tokenizer():
        tokenizer = transformers.MarianTokenizer(
            source_spm=str(spm_file), target_spm=str(spm_file), vocab=str(out / "vocab.json"),
            eos_token=sp.id_to_piece(model.cfg.eos_id), unk_token=sp.id_to_piece(sp.unk_id()),
            pad_token=sp.id_to_piece(model.cfg.pad_id))
    tokenizer.save_pretrained(out)
    return out
