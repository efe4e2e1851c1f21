"""NumPy integer reference of a whole quantized Transformer: the encoder (with the cross-attention keys
and values) and one decoder step, recording every matmul's int8 operands and int32 result.

It is written from the integer scheme that Scale Propagation implements, not from the compiled graph:

* an int8 x int8 matmul gives int32 whose scale is the product of the operands' scales;
* with compile-time (static) scales a bias is folded into the int32 accumulator (``round(bias / scale)``)
  and a static quantizer of an integer tensor requantizes it with an integer multiplier and shift
  (:mod:`.reference`); multiplying by a positive constant, reshapes, transposes and ReLU keep integers
  and move the scale;
* with ``integer_softmax``, the attention softmax of integer scores runs in integers (:mod:`.int_softmax`);
  with ``integer_layer_norm``, residual sums and layer norms (:mod:`.int_layer_norm`);
* every other op (layer norm, softmax, masking, residual additions, run-time range quantizers) reads the
  dequantized float32 value ``float32(q) * float32(scale)`` and runs in float32.

The integer parts are exact, so the compiled graph must reproduce each matmul bit for bit from the same
operands. Its float ops (softmax's exp, the sums of layer norm and softmax) round differently from NumPy
in the last bit now and then, which can move a value that sits on a rounding boundary by one step when it
is next quantized (and later layers with it). The embedding's multiply-add is rounded once, as the
compiled kernel's fused multiply-add. With the integer softmax and layer norm no float op is left between
matmuls, and the whole graph agrees with this reference bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..model.transformer import NEG_INF, Attention, Transformer
from . import int_layer_norm as iln
from . import reference as ref
from .fixed_point import apply_fixed_point, fixed_point
from .int_softmax import PROB_BITS, IntSoftmax
from .modules import ActQuant, QEmbedding, QLinear, QMatMul
from .ops import EPS

LN_EPS = 1e-5


@dataclass(frozen=True)
class Int:
    """An integer tensor and its scale (broadcastable to it): float64 if a compile-time constant, float32
    if computed at run time."""

    data: np.ndarray
    scale: np.ndarray

    @property
    def static(self) -> bool:
        return self.scale.dtype == np.float64

    def map(self, fn: Callable[[np.ndarray], np.ndarray]) -> "Int":
        """Apply a reshape/transpose/slice ``fn`` to the data and, where it varies, to the scale."""
        data = fn(self.data)
        if self.scale.size == 1:
            return Int(data, self.scale.reshape((1,) * data.ndim))
        return Int(data, fn(np.broadcast_to(self.scale, self.data.shape)))

    def times(self, c: float) -> "Int":
        """Multiplication by a positive constant: only the scale changes."""
        factor = np.float64(np.float32(c)) if self.static else np.float32(c)
        return Int(self.data, self.scale * factor)


Value = np.ndarray | Int  # a float32 array, or an integer tensor with its scale


def to_float(v: Value) -> np.ndarray:
    return v.data.astype(np.float32) * v.scale.astype(np.float32) if isinstance(v, Int) else v


def _map(v: Value, fn: Callable[[np.ndarray], np.ndarray]) -> Value:
    return v.map(fn) if isinstance(v, Int) else fn(v)


@dataclass(frozen=True)
class MatmulRecord:
    """One matmul ``a @ b``: int8 operands and int32 result; ``weight`` if ``b`` is a linear layer's
    constant weight (transposed, [K, N]) rather than an activation."""

    name: str
    a: np.ndarray
    b: np.ndarray
    out: np.ndarray
    weight: bool


@dataclass
class IntegerTransformer:
    """The reference for a converted quantized ``model`` (:func:`int8mt.quant.modules.convert`)."""

    model: Transformer
    integer_softmax: bool = False  # as ``ScalePropagation(integer_softmax=True)``
    integer_layer_norm: bool = False  # as ``ScalePropagation(integer_layer_norm=True)``
    records: list[MatmulRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.names = {id(m): name for name, m in self.model.named_modules()}
        self.qmax = next(m.qmax for m in self.model.modules() if isinstance(m, ActQuant))

    # -- quantization ----------------------------------------------------------------------------
    def quantize(self, quant: ActQuant, v: Value) -> Int:
        qmax = quant.qmax
        if quant.dynamic:
            return _quantize_dynamic(to_float(v), qmax, quant.dim)
        s = float(quant.scale)
        if isinstance(v, Int) and v.static:
            return Int(ref.requantize(v.data, v.scale, s, qmax), np.float64(s).reshape((1,) * v.data.ndim))
        x = np.clip(to_float(v), np.float32(-qmax * s), np.float32(qmax * s))
        q = np.clip(np.round(x / np.float32(s)), -128, 127).astype(np.int8)
        return Int(q, np.float64(s).reshape((1,) * q.ndim))

    def _record(self, module: nn.Module, a: np.ndarray, b: np.ndarray, out: np.ndarray, weight: bool) -> None:
        self.records.append(MatmulRecord(self.names[id(module)], a, b, out, weight))

    # -- matmuls ---------------------------------------------------------------------------------
    def linear(self, module: nn.Module, v: Value) -> Value:
        if not isinstance(module, QLinear):  # left in FP32
            bias = 0 if module.bias is None else _np(module.bias)
            return to_float(v) @ _np(module.weight).T + bias
        a = self.quantize(module.act, v)
        w_q, w_scale = _np(module.w_q), _np(module.w_scale).reshape(-1)
        acc = np.matmul(a.data.astype(np.int32), w_q.T.astype(np.int32))
        self._record(module, a.data, w_q.T, acc, weight=True)
        scale = a.scale * (w_scale.astype(np.float64) if a.static else w_scale)
        if module.bias is None:
            return Int(acc, scale)
        bias = _np(module.bias)
        if a.static:
            folded = np.round(bias.astype(np.float64) / scale)
            if np.abs(folded).max(initial=0) < 2 ** 30:
                return Int(acc + folded.astype(np.int32), scale)
        return to_float(Int(acc, scale)) + bias

    def matmul(self, module: nn.Module, a: Value, b: Value) -> Value:
        if not isinstance(module, QMatMul):
            return np.matmul(to_float(a), to_float(b))
        if module.b_act.dynamic:  # b per position (as cached, or quantized here); V's scales folded into a
            qb = b if isinstance(b, Int) and not b.static else self.quantize(module.b_act, b)
            scale = np.take(qb.scale, [0], axis=module.b_act.dim)  # one per position (a cached one is broadcast)
            if module.b_act.dim == -1:
                a, scale = to_float(a) * np.swapaxes(scale, -1, -2), np.ones((1,) * qb.data.ndim, np.float32)
            qb = Int(qb.data, scale)
        else:
            qb = self.quantize(module.b_act, b)
        qa = self.quantize(module.a_act, a)
        acc = np.matmul(qa.data.astype(np.int32), qb.data.astype(np.int32))
        self._record(module, qa.data, qb.data, acc, weight=False)
        return Int(acc, qa.scale * qb.scale)

    # -- the Transformer -------------------------------------------------------------------------
    def embed(self, tokens: np.ndarray, positions: np.ndarray, target: bool = False) -> np.ndarray:
        emb = self.model.target_embeddings if target else self.model.embed_tokens
        scale = np.float32(self.model.embed_scale)
        if isinstance(emb, QEmbedding):
            rows, row_scale = _np(emb.w_q)[tokens].astype(np.float32), _np(emb.w_scale)[tokens] * scale
        else:
            rows, row_scale = _np(emb.weight)[tokens], scale
        # one rounding for multiply-add, as the compiled kernel's fused multiply-add (LLVM contracts them)
        pos = _np(self.model.positions)[positions]
        return (rows.astype(np.float64) * np.float64(row_scale) + pos).astype(np.float32)

    def split_heads(self, attn: Attention, v: Value) -> Value:
        b, t = _shape(v)[:2]
        return _map(v, lambda x: x.reshape(b, t, attn.heads, attn.head_dim).transpose(0, 2, 1, 3))

    def project_kv(self, attn: Attention, x: Value) -> tuple[Value, Value]:
        return (self.split_heads(attn, self.linear(attn.k_proj, x)),
                self.split_heads(attn, self.linear(attn.v_proj, x)))

    def attend(self, attn: Attention, x: Value, k: Value, v: Value, bias: np.ndarray | None) -> Value:
        q = self.linear(attn.q_proj, x)
        q = self.split_heads(attn, q.times(attn.scaling) if isinstance(q, Int) else q * np.float32(attn.scaling))
        scores = self.matmul(attn.qk, q, _map(k, lambda t: t.swapaxes(2, 3)))
        if self.integer_softmax and isinstance(scores, Int) and scores.static:
            probs = Int(IntSoftmax.for_scale(float(scores.scale.reshape(-1)[0]))(scores.data, bias),
                        np.float64(2.0 ** -PROB_BITS).reshape((1,) * scores.data.ndim))
        else:
            scores = to_float(scores)
            probs = _softmax(scores if bias is None else scores + bias)
        ctx = self.matmul(attn.av, probs, v)
        b, t = _shape(x)[:2]
        ctx = _map(ctx, lambda c: c.transpose(0, 2, 1, 3).reshape(b, t, attn.heads * attn.head_dim))
        return self.linear(attn.out_proj, ctx)

    def add_norm(self, norm: nn.LayerNorm, x: Value, residual: Value) -> Value:
        """``norm(x + residual)``: in integers on the grid of :mod:`.int_layer_norm` when enabled and an
        addend is an integer tensor with a constant scale, else in float32."""
        addends = (x, residual)
        if self.integer_layer_norm and any(isinstance(a, Int) for a in addends) and all(
                not isinstance(a, Int) or a.static for a in addends):
            total = sum(_on_grid(a) for a in addends)
            ln = iln.IntLayerNorm.for_params(_np(norm.weight), _np(norm.bias), norm.eps)
            return Int(ln(total), np.float64(iln.OUTPUT_SCALE).reshape((1,) * total.ndim))
        return _layer_norm(norm, to_float(x) + to_float(residual))

    def ffn(self, layer: nn.Module, x: Value) -> Value:
        h = self.linear(layer.ffn.fc1, x)
        h = Int(np.maximum(h.data, 0), h.scale) if isinstance(h, Int) else np.maximum(h, np.float32(0))
        return self.linear(layer.ffn.fc2, h)

    def source_bias(self, src: np.ndarray) -> np.ndarray:
        return (src == self.model.cfg.pad_id).astype(np.float32)[:, None, None, :] * np.float32(NEG_INF)

    @property
    def int8_cache(self) -> bool:
        return self.model.cache_dtype == torch.int8

    def store(self, attn: Attention, k: Value, v: Value) -> tuple[Value, Value]:
        """Keys and values as a cache holds them: int8 with the QK^T / softmax·V operand scales, int8 with a
        scale per position (run-time ranges), or float32."""
        if self.model.cache_scales:
            return (_quantize_dynamic(to_float(k), attn.qk.b_act.qmax, -1),
                    _quantize_dynamic(to_float(v), attn.av.b_act.qmax, -1))
        if self.int8_cache:
            return self.quantize(attn.qk.b_act, k).data, self.quantize(attn.av.b_act, v).data
        return to_float(k), to_float(v)

    def load(self, attn: Attention, k: Value, v: Value) -> tuple[Value, Value]:
        if isinstance(k, Int) or k.dtype != np.int8:
            return k, v
        return (Int(k, np.float64(float(attn.qk.b_act.scale)).reshape((1,) * k.ndim)),
                Int(v, np.float64(float(attn.av.b_act.scale)).reshape((1,) * v.ndim)))

    def encode(self, src: np.ndarray) -> tuple[np.ndarray, ...]:
        """Source ids [B, S] -> the cross-attention cache: keys/values [L, 2, B, H, S, Dh] in the model's cache
        dtype (and their scales [L, 2, B, H, S, 1])."""
        bias = self.source_bias(src)
        x = self.embed(src, np.arange(src.shape[1]))
        for layer in self.model.encoder_layers:
            k, v = self.project_kv(layer.self_attn, x)
            x = self.add_norm(layer.self_attn_layer_norm, x, self.attend(layer.self_attn, x, k, v, bias))
            x = self.add_norm(layer.final_layer_norm, x, self.ffn(layer, x))
        stored = [[_parts(c) for c in self.store(layer.cross_attn, *self.project_kv(layer.cross_attn, x))]
                  for layer in self.model.decoder_layers]
        return tuple(np.stack([np.stack([k[p], v[p]]) for k, v in stored]) for p in range(len(stored[0][0])))

    def decode_step(self, tokens: np.ndarray, step: int, cache: tuple[np.ndarray, ...], history: np.ndarray,
                    cross: tuple[np.ndarray, ...], src: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        """tokens [B, 1] at position ``step``, the self-attention ``cache`` (rows [L, 2, N, H, Dh], and their scales)
        and ``history`` [B, T + 1] (see :mod:`int8mt.model.transformer`) -> (logits [B, V], each layer's new key and
        value, then their scales)."""
        bias = self.source_bias(src)
        x = self.embed(tokens, np.array([step]), target=True)
        past = [c[:, :, history[:, :-1]].transpose(0, 1, 2, 4, 3, 5) for c in cache]  # [L, 2, B, H, T, Dh]
        new_kv = []
        for i, layer in enumerate(self.model.decoder_layers):
            stored = self.store(layer.self_attn, *self.project_kv(layer.self_attn, x))
            new_kv += stored
            k, v = (_cached([np.concatenate([p[i, j], n], 2) for p, n in zip(past, _parts(new))])
                    for j, new in enumerate(stored))
            k, v = self.load(layer.self_attn, k, v)
            x = self.add_norm(layer.self_attn_layer_norm, x, self.attend(layer.self_attn, x, k, v, None))
            cross_k, cross_v = self.load(layer.cross_attn, *(_cached([c[i, j] for c in cross]) for j in (0, 1)))
            attended = self.attend(layer.cross_attn, x, cross_k, cross_v, bias)
            x = self.add_norm(layer.cross_attn_layer_norm, x, attended)
            x = self.add_norm(layer.final_layer_norm, x, self.ffn(layer, x))
        logits = to_float(self.linear(self.model.lm_head, _map(x, lambda a: a[:, 0])))
        return logits, tuple(part for parts in zip(*map(_parts, new_kv)) for part in parts)


def _quantize_dynamic(x: np.ndarray, qmax: int, dim: int) -> Int:
    """Run-time quantization: one scale per slice along ``dim`` (float32, as :func:`.ops.quantize_dynamic`)."""
    amax = np.abs(x).max(axis=dim, keepdims=True)
    scale = np.maximum(amax, np.float32(EPS)) / np.float32(qmax)
    return Int(np.clip(np.round(x / scale), -qmax, qmax).astype(np.int8), scale)


def _parts(v: Value) -> tuple[np.ndarray, ...]:
    """A cached key or value as its cache's tensors: float32 or int8 values, or int8 values and their scales."""
    return (v.data, v.scale) if isinstance(v, Int) else (v,)


def _cached(parts: list[np.ndarray]) -> Value:
    """The inverse of :func:`_parts`."""
    return Int(*parts) if len(parts) == 2 else parts[0]


def _shape(v: Value) -> tuple[int, ...]:
    return v.data.shape if isinstance(v, Int) else v.shape


def _on_grid(v: Value) -> np.ndarray:
    """An addend of a residual sum as int64 on the layer-norm input grid."""
    if isinstance(v, Int):
        mult, shift = fixed_point(np.broadcast_to(v.scale, v.data.shape) / iln.INPUT_SCALE)
        return apply_fixed_point(v.data, mult, shift)
    return np.round(v * np.float32(1.0 / iln.INPUT_SCALE)).astype(np.int64)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _layer_norm(norm: nn.LayerNorm, x: np.ndarray) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = np.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + np.float32(LN_EPS)) * _np(norm.weight) + _np(norm.bias)

