"""The same weights in ONNX Runtime: a model directory (ours or a Hugging Face Marian one) exported with PyTorch's
ONNX exporter as the graphs a sequence-to-sequence model runs as in ONNX Runtime (an encoder and a decoder step
over past keys and values, like Hugging Face Optimum's encoder and decoder-with-past graphs; here the encoder also
computes the cross-attention keys and values), optimized by ONNX Runtime's transformer optimizer
(``model_type="bart"``: layer norms fused with their residual additions) and for INT8 quantized by ONNX Runtime's
dynamic quantization (int8 weights, each activation quantized at run time): ONNX Runtime's own recipe for a
Transformer on the CPU. Needs ``onnx``, ``onnxscript`` and ``onnxruntime`` (``pip install 'int8mt[bench]'``).

* ``encoder.onnx``: ``src [B, S]`` int64 -> each decoder layer's cross-attention keys and values
  (``cross_k_0``, ``cross_v_0``, ``cross_k_1``, ... each ``[B, H, S, Dh]``), computed once per sentence.
* ``decoder.onnx``: ``tokens [B, 1]``, ``step [1]`` (their position), ``src [B, S]`` (the padding mask),
  ``candidates [1]`` (K), then per layer ``past_k_i``, ``past_v_i`` ``[B, H, T, Dh]`` and ``cross_k_i``,
  ``cross_v_i`` -> each row's K largest logits and their ids (ONNX ``TopK``), the row's log-sum-exp, and per layer
  ``present_k_i``, ``present_v_i`` ``[B, H, T + 1, Dh]``. The choice among a row's candidates is in the graph,
  so the host reads 2 x beam numbers per row and step, not the whole logits.

``onnxruntime.json`` beside them holds what the search needs (special token ids, layers, heads, head size, the
positions) and how the graphs were made.
"""
from __future__ import annotations

import json
import logging
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

from int8mt.errors import UserError

ENCODER_FILE, DECODER_FILE, CONFIG_FILE = "encoder.onnx", "decoder.onnx", "onnxruntime.json"
OPSET = 18
PRECISIONS = ("int8", "float32")


def import_onnxruntime():
    """``onnxruntime``, or a UserError saying what to install."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError("the ONNX Runtime comparison needs onnxruntime, onnx and onnxscript: "
                        "pip install 'int8mt[bench]'") from None
    return onnxruntime


def _graphs(model):
    """The encoder and the decoder step of ``model`` (an int8mt Transformer) as modules for the exporter."""
    import torch
    from torch import nn

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, src):
            memory = self.model.encode(src)
            return tuple(t for layer in self.model.decoder_layers for t in layer.cross_attn.project_kv(memory))

    class DecoderStep(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, tokens, step, src, candidates, caches):
            m = self.model
            x = m.embed(tokens, step, target=True)
            bias = m.source_bias(src)
            presents = []
            for i, layer in enumerate(m.decoder_layers):
                past_k, past_v, cross_k, cross_v = caches[4 * i: 4 * i + 4]
                new_k, new_v = layer.self_attn.project_kv(x)
                k, v = torch.cat([past_k, new_k], 2), torch.cat([past_v, new_v], 2)
                presents += [k, v]
                x = layer(x, k, v, None, cross_k, cross_v, bias)
            logits = m.lm_head(x[:, 0])
            values, ids = torch.topk(logits, candidates[0], dim=-1)  # (k an input: one graph for greedy and beams)
            return values, ids, torch.logsumexp(logits, -1), *presents

    return Encoder().eval(), DecoderStep().eval()


def _cache_names(layers: int) -> tuple[list[str], list[str]]:
    inputs = [f"{kind}_{w}_{i}" for i in range(layers) for kind, w in (("past", "k"), ("past", "v"),
                                                                       ("cross", "k"), ("cross", "v"))]
    return inputs, [f"present_{w}_{i}" for i in range(layers) for w in "kv"]


@contextmanager
def _quiet_exporter():
    """PyTorch's exporter and ONNX Runtime's optimizer and quantizer without their progress lines and advice (the
    exporter's notes on missing torchvision operators, the quantizer's "consider pre-processing" through the root
    logger)."""
    loggers = [logging.getLogger(), logging.getLogger("torch.onnx"), logging.getLogger("onnxruntime")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@contextmanager
def _export_errors(model_dir: Path):
    """A failure inside PyTorch's exporter or ONNX Runtime's tools as a UserError naming the model and the step's
    error, not their traceback."""
    try:
        yield
    except UserError:
        raise
    except (RuntimeError, ValueError, TypeError, AssertionError, OSError) as err:
        raise UserError(f"exporting {model_dir} to ONNX Runtime failed: {type(err).__name__}: "
                        f"{str(err).strip().splitlines()[-1] if str(err).strip() else ''}") from None


def export_to_onnxruntime(model_dir: Path, out: Path, precision: str = "int8") -> Path:
    """``model_dir`` as ONNX Runtime's encoder and decoder graphs in ``out``, optimized: float32 weights, or for
    ``int8`` quantized with ``onnxruntime.quantization.quantize_dynamic`` (int8 weights of every operator it
    quantizes: the linear layers' ``MatMul`` and the embeddings' ``Gather``)."""
    if precision not in PRECISIONS:
        raise UserError(f"ONNX Runtime runs the comparison in {' or '.join(PRECISIONS)}, not {precision}")
    onnxruntime = import_onnxruntime()
    import torch
    from torch.export import Dim

    from int8mt.model.checkpoint import load_model_dir

    model = load_model_dir(model_dir)
    cfg = model.cfg
    out = Path(out)
    encoder, decoder = _graphs(model)
    batch, length, past = 2, 5, 3
    src = torch.full((batch, length), 5, dtype=torch.int64)
    cache_inputs, presents = _cache_names(cfg.decoder_layers)
    caches = [torch.zeros(batch, cfg.heads, past if name.startswith("past") else length, cfg.head_dim)
              for name in cache_inputs]
    free = Dim.AUTO
    with tempfile.TemporaryDirectory(prefix="int8mt-onnx-") as tmp, _quiet_exporter(), torch.no_grad(), \
            _export_errors(model_dir):
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tmp)
        torch.onnx.export(encoder, (src,), staging / ENCODER_FILE, input_names=["src"],
                          output_names=[n for n in cache_inputs if n.startswith("cross")],
                          dynamic_shapes=({0: free, 1: free},), opset_version=OPSET, external_data=False,
                          dynamo=True, verbose=False)
        step_inputs = (torch.zeros(batch, 1, dtype=torch.int64), torch.tensor([past]), src, torch.tensor([2]), caches)
        torch.onnx.export(decoder, step_inputs, staging / DECODER_FILE,
                          input_names=["tokens", "step", "src", "candidates", *cache_inputs],
                          output_names=["values", "ids", "log_sum_exp", *presents],
                          dynamic_shapes=({0: free}, None, {0: free, 1: free}, None,
                                          [{0: free, 2: free}] * len(caches)),
                          opset_version=OPSET, external_data=False, dynamo=True, verbose=False)
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.transformers.optimizer import optimize_model

        for name in (ENCODER_FILE, DECODER_FILE):
            optimized = staging / f"optimized-{name}" if precision == "int8" else out / name
            graph = optimize_model(str(staging / name), model_type="bart", num_heads=cfg.heads, hidden_size=cfg.d_model)
            graph.save_model_to_file(str(optimized))
            if precision == "int8":
                quantize_dynamic(optimized, out / name, weight_type=QuantType.QInt8)
    settings = {"start_id": cfg.decoder_start_id, "eos_id": cfg.eos_id, "pad_id": cfg.pad_id,
                "decoder_layers": cfg.decoder_layers, "heads": cfg.heads, "head_dim": cfg.head_dim,
                "max_positions": cfg.max_positions, "precision": precision, "onnxruntime": onnxruntime.__version__,
                "torch": torch.__version__, "opset": OPSET, "model": str(model_dir)}
    (out / CONFIG_FILE).write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")
    return out
