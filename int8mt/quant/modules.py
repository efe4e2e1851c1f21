"""Quantized replacements for the Transformer's matmul modules and the model-level ``prepare``/``convert``.

Life cycle of a quantized model:

1. :func:`prepare` swaps every ``nn.Linear`` (Q/K/V/output projections, FFN, logits), every
   :class:`~int8mt.model.transformer.MatMul` (QK^T, softmax·V) and the tied embedding for quantized modules.
   Each matmul input gets an :class:`ActQuant`; weights are quantized per output channel.
2. Ranges: :mod:`.calibrate` (observers), :mod:`.qat` (learned, ``train()`` mode fake-quantizes with a
   straight-through estimator) or none (``runtime``: scales computed per row while translating).
3. :func:`convert` freezes the weights into int8 buffers with their scales: the inference/export form, in
   which every quantization is an ``int8mt::quantize``/``dequantize`` custom op that ``torch.export`` keeps.
"""
from __future__ import annotations

from fnmatch import fnmatch

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError
from ..model.transformer import MatMul, Quantized, Transformer
from . import ops
from .config import QuantConfig


class ActQuant(nn.Module):
    """Quantizer of one matmul input.

    Static (per tensor): the scale is ``exp(log_scale)``, learnable in training; :func:`convert` fixes it as
    the buffer ``scale``. Dynamic (``runtime`` ranges): one scale per slice along ``dim``, the slices that do
    not cross the matmul's reduction axis (-1 for the left operand, -2 for the right one).
    """

    def __init__(self, qmax: int, dynamic: bool, dim: int) -> None:
        super().__init__()
        self.qmax, self.dynamic, self.dim = qmax, dynamic, dim
        self.log_scale = None if dynamic else nn.Parameter(torch.zeros(()))
        self.observer = None  # set by calibration: forward then records inputs and returns them unchanged

    def set_scale(self, scale: float) -> None:
        with torch.no_grad():
            self.log_scale.copy_(torch.log(torch.tensor(scale)))

    def forward(self, x: Tensor) -> Tensor:
        if self.observer is not None:
            self.observer.update(x)
            return x
        if self.dynamic:
            if self.training:
                return ops.fake_quant(x, ops.dynamic_scale(x, self.qmax, self.dim).detach(), self.qmax)
            q, scale = ops.quantize_dynamic(x, self.qmax, self.dim)
            return ops.dequantize(q, scale)
        if hasattr(self, "scale"):  # converted
            return ops.dequantize(ops.quantize(x, self.scale, self.qmax), self.scale)
        return ops.fake_quant(x, self.log_scale.exp(), self.qmax)

    def freeze(self) -> None:
        if not self.dynamic:
            self.register_buffer("scale", self.log_scale.detach().exp().clone())
            self.log_scale = None

    def extra_repr(self) -> str:
        return f"qmax={self.qmax}, " + (f"dynamic, dim={self.dim}" if self.dynamic else "static")


class _QuantWeight(nn.Module):
    """A weight [N, K] quantized per row; float and fake-quantized until :meth:`freeze`, then int8 buffers."""

    qmax: int

    def dequantized_weight(self) -> Tensor:
        if hasattr(self, "w_q"):
            return ops.dequantize(self.w_q, self.w_scale)
        return ops.fake_quant(self.weight, ops.weight_scale(self.weight, self.qmax), self.qmax)

    def freeze(self, cache: dict[int, tuple[Tensor, Tensor]]) -> None:
        """Replace ``weight`` by ``w_q`` (int8) and ``w_scale`` (float [N, 1]); tied weights share buffers."""
        key = id(self.weight)
        if key not in cache:
            w = self.weight.detach()
            scale = ops.weight_scale(w, self.qmax)
            cache[key] = (ops.quantize(w, scale, self.qmax), scale)
        del self.weight
        w_q, w_scale = cache[key]
        self.register_buffer("w_q", w_q)
        self.register_buffer("w_scale", w_scale)


class QLinear(_QuantWeight):
    def __init__(self, linear: nn.Linear, qmax: int, dynamic: bool) -> None:
        super().__init__()
        self.qmax = qmax
        self.weight, self.bias = linear.weight, linear.bias
        self.act = ActQuant(qmax, dynamic, dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.act(x), self.dequantized_weight(), self.bias)


class QEmbedding(_QuantWeight):
    """Token embedding stored as int8 rows with one scale per token (tied to the logits projection)."""

    def __init__(self, embedding: nn.Embedding, qmax: int) -> None:
        super().__init__()
        self.qmax = qmax
        self.weight = embedding.weight

    def forward(self, ids: Tensor) -> Tensor:
        if hasattr(self, "w_q"):
            return ops.dequantize(F.embedding(ids, self.w_q), F.embedding(ids, self.w_scale))
        return F.embedding(ids, self.dequantized_weight())


class QMatMul(nn.Module):
    """``a @ b`` between two activations, both quantized (QK^T and softmax·V).

    With run-time ranges ``a`` is quantized per row and ``b`` per position (the columns of QK^T's K^T, the rows of
    softmax·V's V), so that a key or value is quantized once, when a cache stores it (:meth:`store`), and never
    again. V's scales vary along the reduction axis: they are folded into ``a``, whose row is then quantized,
    ``sum_t p_t (s_t v_t) = sum_t (p_t s_t) v_t``, and the product takes the int8 values alone.
    """

    def __init__(self, qmax: int, dynamic: bool, right_positions: int) -> None:
        super().__init__()
        self.a_act = ActQuant(qmax, dynamic, dim=-1)
        # run-time ranges: one scale per position of b, from its largest magnitude over the head's features
        self.b_act = ActQuant(qmax, dynamic, dim=-2 if right_positions == -1 else -1)
        if dynamic:
            self.register_buffer("unit", torch.ones(()), persistent=False)  # the scale of V's folded values

    def forward(self, a: Tensor, b: Tensor | Quantized) -> Tensor:
        if not self.b_act.dynamic:
            return torch.matmul(self.a_act(a), self.b_act(b))
        if not isinstance(b, Quantized):
            b = self._quantize(b, self.b_act.dim)
        if self.b_act.dim == -1:  # V's scales, one per row: folded into the probabilities
            a, b = a * b.scale.transpose(-1, -2), Quantized(b.q, self.unit)
        return torch.matmul(self.a_act(a), self._dequantize(b))

    def _quantize(self, x: Tensor, dim: int) -> Quantized:
        qmax = self.b_act.qmax
        scale = ops.dynamic_scale(x, qmax, dim)
        if self.training:  # integers in float32 with a straight-through gradient
            return Quantized(ops.fake_quant(x, scale.detach(), qmax) / scale.detach(), scale.detach())
        return Quantized(*ops.quantize_dynamic(x, qmax, dim))

    def _dequantize(self, b: Quantized) -> Tensor:
        return b.q * b.scale if self.training else ops.dequantize(b.q, b.scale)

    @property
    def stores_int8(self) -> bool:
        """True if a key/value cache can hold the right operand as int8, quantized once when written instead of
        at every read: it has a fixed per-tensor scale (converted, static ranges) or one per position (run-time
        ranges, :attr:`stores_scales`)."""
        return self.b_act.dynamic or hasattr(self.b_act, "scale")

    @property
    def stores_scales(self) -> bool:
        """True if a cache holds a scale per position and head next to the int8 keys or values."""
        return self.b_act.dynamic

    def store(self, x: Tensor) -> Tensor | Quantized:
        """``x`` (keys or values, ``[..., positions, head_dim]``) as a cache holds it: int8 with the right
        operand's fixed scale, or per position with its scales (requires :attr:`stores_int8`)."""
        if self.b_act.dynamic:
            return self._quantize(x, -1)
        return ops.quantize(x, self.b_act.scale, self.b_act.qmax)

    def load(self, q: Tensor) -> Tensor:
        """The float value of an int8 operand stored with a fixed scale; the right operand's quantizer gives ``q``
        back exactly."""
        return ops.dequantize(q, self.b_act.scale)


def matmul_sites(model: nn.Module) -> list[str]:
    """Names of every matmul of the model (linear layers and activation-activation products)."""
    return [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, MatMul, QLinear, QMatMul))]


def prepare(model: Transformer, qcfg: QuantConfig) -> list[str]:
    """Swap the matmuls of ``model`` (in place) for quantized modules; returns the names left in FP32. A
    ``keep_fp32`` pattern that names no matmul is an error (a typo would quantize what it meant to keep)."""
    dynamic = qcfg.ranges == "runtime"
    sites = list(matmul_sites(model))
    unmatched = [p for p in qcfg.keep_fp32 if not any(fnmatch(name, p) for name in sites)]
    if unmatched:
        raise UserError(f"--keep-fp32 {', '.join(map(repr, unmatched))} names no matmul of the model; its matmuls "
                        f"are named like {sites[0]!r} and {sites[-1]!r} (globs such as 'decoder_layers.*.qk')")
    kept = []
    for name in sites:
        if any(fnmatch(name, p) for p in qcfg.fp32_patterns):
            kept.append(name)
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, attr)
        new = (QMatMul(qcfg.qmax, dynamic, old.right_positions) if isinstance(old, MatMul)
               else QLinear(old, qcfg.qmax, dynamic))
        setattr(parent, attr, new)
    if "lm_head" not in kept:  # embeddings in int8; a table tied to the logits projection shares its int8 table
        model.embed_tokens = QEmbedding(model.embed_tokens, qcfg.qmax)
        if not model.cfg.shared_embeddings:
            model.decoder_embed_tokens = QEmbedding(model.decoder_embed_tokens, qcfg.qmax)
    return kept


def act_quantizers(model: nn.Module) -> dict[str, ActQuant]:
    return {name: m for name, m in model.named_modules() if isinstance(m, ActQuant)}


@torch.no_grad()
def convert(model: Transformer) -> Transformer:
    """Freeze a prepared model into its inference form (int8 weights and fixed scales), in eval mode."""
    cache: dict[int, tuple[Tensor, Tensor]] = {}
    for module in list(model.modules()):
        if isinstance(module, (_QuantWeight, ActQuant)) and not _is_frozen(module):
            if isinstance(module, _QuantWeight):
                module.freeze(cache)
            else:
                module.freeze()
    return model.eval()


def _is_frozen(module: nn.Module) -> bool:
    return hasattr(module, "w_q") or (isinstance(module, ActQuant) and module.log_scale is None)
