"""Quantized model directories (the output of quantization-aware fine-tuning) and the one entry point that
turns a model directory into a converted quantized model for any range method."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from ..data import read_parallel
from ..errors import UserError
from ..model.checkpoint import CONFIG_FILE, is_marian_dir, load_model_dir
from ..model.config import ModelConfig
from ..model.transformer import Transformer
from ..tokenizer import MarianTokenizer, Tokenizer, load_tokenizer
from .calibrate import calibrate, self_translated
from .config import QuantConfig
from .modules import convert, prepare

QUANT_FILE, QUANT_WEIGHTS_FILE = "quant.json", "quantized.safetensors"


def learned_dir(model_dir: Path, bits: int) -> Path:
    """Where ``int8mt qat`` writes (and ``compile --ranges learned`` reads) the fine-tuned model."""
    return Path(model_dir) / f"qat-int{bits}"


def save_quantized(model: Transformer, qcfg: QuantConfig, out_dir: Path, tokenizer: Tokenizer | MarianTokenizer,
                   record: dict) -> None:
    """Write a converted model: int8 weights with scales, fixed activation scales, config, the tokenizer's
    files and the record."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).write_text(json.dumps(model.cfg.to_dict(), indent=2) + "\n")
    save_model(model, str(out_dir / QUANT_WEIGHTS_FILE))
    for file in tokenizer.files:
        if file.resolve() != (out_dir / file.name).resolve():
            shutil.copyfile(file, out_dir / file.name)
    meta = {"bits": qcfg.bits, "ranges": qcfg.ranges, "keep_fp32": list(qcfg.keep_fp32), **record}
    (out_dir / QUANT_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def load_quantized(qdir: Path) -> tuple[Transformer, QuantConfig]:
    """Load a directory written by :func:`save_quantized` (converted, eval mode)."""
    qdir = Path(qdir)
    for name in (CONFIG_FILE, QUANT_FILE, QUANT_WEIGHTS_FILE):
        if not (qdir / name).is_file():
            raise UserError(f"{qdir} is not a quantized model directory: {name} is missing")
    meta = json.loads((qdir / QUANT_FILE).read_text())
    qcfg = QuantConfig(bits=meta["bits"], ranges=meta["ranges"], keep_fp32=tuple(meta["keep_fp32"]))
    model = Transformer(ModelConfig.load(qdir / CONFIG_FILE))
    prepare(model, qcfg)
    convert(model)
    try:
        load_model(model, str(qdir / QUANT_WEIGHTS_FILE))
    except (SafetensorError, RuntimeError, OSError) as err:
        raise UserError(f"cannot load {qdir / QUANT_WEIGHTS_FILE}: {err}") from None
    return model.eval(), qcfg


def quantized_model(model_dir: Path, qcfg: QuantConfig, data_dir: Path, src_lang: str = "en",
                    tgt_lang: str = "de", calib_sentences: int = 512, calib_data: Path | None = None) -> Transformer:
    """The converted quantized model of ``model_dir`` with ranges from ``qcfg.ranges``; calibration reads
    ``calib_data`` (source sentences), else the training split in ``data_dir``."""
    if qcfg.ranges == "learned":
        qdir = learned_dir(model_dir, qcfg.bits)
        if not qdir.is_dir():
            raise UserError(f"no learned ranges for {qcfg.name} in {model_dir} ({qdir.name}/ is missing); "
                             f"run `int8mt qat {model_dir} --bits {qcfg.bits}` first, or use "
                             "--ranges calibrate or --ranges runtime")
        model, saved = load_quantized(qdir)
        if saved.bits != qcfg.bits or saved.keep_fp32 != qcfg.keep_fp32:
            raise UserError(f"{qdir} holds an int{saved.bits} model keeping {list(saved.keep_fp32)} in FP32, "
                             f"not the requested {qcfg.name} keeping {list(qcfg.keep_fp32)}")
        return model
    model = load_model_dir(model_dir)
    if qcfg.ranges != "calibrate":
        prepare(model, qcfg)
        return convert(model)
    tok = load_tokenizer(model_dir)
    if calib_data is not None:
        sources, targets = self_translated(model, tok, calib_data, calib_sentences)
    elif is_marian_dir(model_dir):
        raise UserError("calibration needs sentences in the model's source language: pass --calib-data FILE (one "
                        "sentence per line), or use --ranges runtime")
    else:
        sources, targets = read_parallel(data_dir, "train", src_lang, tgt_lang)
    prepare(model, qcfg)
    calibrate(model, qcfg, tok, sources[:calib_sentences], targets[:calib_sentences])
    return convert(model)
