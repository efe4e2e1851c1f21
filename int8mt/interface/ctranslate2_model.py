"""The same weights in CTranslate2: a model directory (ours or a Hugging Face Marian one) converted with
CTranslate2's own converter, so that the comparison runs CTranslate2 as its users do. Needs ``ctranslate2`` and
``transformers`` (``pip install 'int8mt[bench]'``).

CTranslate2's Marian loader assumes what OPUS-MT models are: the decoder starts from the ``<pad>`` token, the
last of the vocabulary, whose embedding is zeros (it drops that row and starts from a zero vector). A Marian
directory exported from one of our models starts from ``<s>``, a learned embedding, and has ``<pad>`` first;
for such a directory the loader keeps the vocabulary whole and starts from the start token, as ``transformers``
runs the model.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from int8mt.errors import UserError
from int8mt.model.checkpoint import is_marian_dir



def _import_ctranslate2():
    try:
        import ctranslate2
        import ctranslate2.converters.transformers  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise UserError("the CTranslate2 comparison needs ctranslate2 and transformers: "
                        "pip install 'int8mt[bench]'") from None
    return ctranslate2


def _start_token_loader():
    """CTranslate2's Marian loader for a decoder that starts from its start token's own embedding."""
    from ctranslate2.converters.transformers import BartLoader, MarianMTLoader

    class StartTokenMarianLoader(MarianMTLoader):
        def set_config(self, config, model, tokenizer):
            super().set_config(config, model, tokenizer)
            config.decoder_start_token = tokenizer.convert_ids_to_tokens(model.config.decoder_start_token_id)

        def set_decoder(self, spec, decoder):
            BartLoader.set_decoder(self, spec, decoder)  # start_from_zero_embedding stays False

        def get_vocabulary(self, model, tokenizer):
            return BartLoader.get_vocabulary(self, model, tokenizer)

        def _remove_pad_weights(self, spec):
            pass  # no trailing <pad> row to drop

    return StartTokenMarianLoader()


def _converter(ctranslate2, marian_dir: Path):
    """CTranslate2's converter for ``marian_dir``, with the start-token loader where the model needs it."""
    import torch
    import transformers
    from ctranslate2.converters.transformers import MarianMTLoader

    from int8mt.model.converters.marian_export import quiet_marian_tokenizer

    class MarianConverter(ctranslate2.converters.Converter):
        def _load(self):
            model = transformers.MarianMTModel.from_pretrained(marian_dir).eval()
            with quiet_marian_tokenizer():
                tokenizer = transformers.MarianTokenizer.from_pretrained(marian_dir)
            start = model.config.decoder_start_token_id
            table = model.get_decoder().embed_tokens.weight
            stock = start == len(tokenizer) - 1 and not bool(torch.count_nonzero(table[start]))
            with torch.no_grad():
                return (MarianMTLoader() if stock else _start_token_loader())(model, tokenizer)

    return MarianConverter()


def convert_to_ctranslate2(model_dir: Path, out: Path, quantization: str = "int8") -> Path:
    """``model_dir`` as a CTranslate2 model in ``out`` with weights quantized as ``quantization``."""
    ctranslate2 = _import_ctranslate2()
    model_dir = Path(model_dir)
    with tempfile.TemporaryDirectory(prefix="int8mt-marian-") as tmp:
        marian_dir = model_dir
        if not is_marian_dir(model_dir):
            from int8mt.model.converters.marian_export import export_marian

            marian_dir = export_marian(model_dir, Path(tmp) / "marian")
        _converter(ctranslate2, marian_dir).convert(str(out), quantization=quantization, force=True)
    return Path(out)
