"""PyTorch side of quantization: which matmuls are quantized, calibration, conversion, checkpoints."""
import pytest
import torch

from int8mt.model.transformer import Transformer
from int8mt.quant import ops
from int8mt.quant.calibrate import Observer, calibrate
from int8mt.quant.checkpoint import load_quantized, quantized_model, save_quantized
from int8mt.errors import UserError
from int8mt.quant.config import QuantConfig
from int8mt.quant.modules import QEmbedding, QLinear, QMatMul, act_quantizers, convert, matmul_sites, prepare
from int8mt.quant.qat import QATConfig, scheduled_batches
from int8mt.tokenizer import Tokenizer

from ..conftest import DATA_DIR, MODEL_DIR, TINY


def _tiny() -> Transformer:
    torch.manual_seed(0)
    return Transformer(TINY).eval()


def test_every_matmul_is_quantized():
    model = _tiny()
    assert len(matmul_sites(model)) == 8 * TINY.encoder_layers + 14 * TINY.decoder_layers + 1
    assert prepare(model, QuantConfig()) == []
    assert all(isinstance(m, (QLinear, QMatMul)) for n, m in model.named_modules() if n in matmul_sites(model))
    assert isinstance(model.embed_tokens, QEmbedding)


def test_keep_fp32_patterns_leave_those_matmuls_alone():
    model = _tiny()
    kept = prepare(model, QuantConfig(keep_fp32=("decoder_layers.*.self_attn.qk", "lm_head")))
    assert kept == ["decoder_layers.0.self_attn.qk", "decoder_layers.1.self_attn.qk", "lm_head"]
    assert not isinstance(model.embed_tokens, QEmbedding)  # tied to the FP32 logits projection


def test_a_keep_fp32_pattern_that_names_no_matmul_is_refused():
    with pytest.raises(UserError, match=r"--keep-fp32 'decoder_layers\.\*\.self_atn\.qk' names no matmul of the "
                                        r"model; its matmuls are named like 'encoder_layers\.0\.self_attn\.q_proj'"):
        prepare(_tiny(), QuantConfig(keep_fp32=("lm_head", "decoder_layers.*.self_atn.qk")))


def test_run_time_ranges_leave_the_attention_matmuls_in_fp32_only_if_asked():
    attention = [n for n in matmul_sites(_tiny()) if n.endswith((".qk", ".av"))]
    assert len(attention) == 2 * TINY.encoder_layers + 4 * TINY.decoder_layers
    assert prepare(_tiny(), QuantConfig(ranges="runtime", runtime_attention="float32")) == attention
    assert prepare(_tiny(), QuantConfig(ranges="runtime")) == []
    assert prepare(_tiny(), QuantConfig(ranges="calibrate")) == []  # static ranges: int8 caches, int8 attention
    assert QuantConfig(ranges="runtime", runtime_attention="float32",
                       keep_fp32=("*.qk", "lm_head")).fp32_patterns == ("*.qk", "lm_head", "*.av")
    with pytest.raises(UserError, match="unknown attention precision 'int4'"):
        QuantConfig(ranges="runtime", runtime_attention="int4")


def test_run_time_int8_attention_quantizes_keys_and_values_per_position():
    """QK^T's K^T per column and softmax·V's V per row, V's scales folded into the probabilities: a key or value
    quantized when a cache stores it gives the product it gives unstored, and the product is close to FP32's."""
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8) * torch.rand(1, 1, 6, 1) * 4
    p = torch.softmax(torch.randn(2, 4, 3, 6), -1)
    qk, av = (QMatMul(127, dynamic=True, right_positions=axis).eval() for axis in (-1, -2))
    stored_k, stored_v = qk.store(k), av.store(v)
    assert stored_k.q.dtype == torch.int8 and stored_k.scale.shape == stored_v.scale.shape == (2, 4, 6, 1)
    torch.testing.assert_close(qk(q, stored_k.transpose(2, 3)), qk(q, k.transpose(2, 3)), rtol=0, atol=0)
    torch.testing.assert_close(av(p, stored_v), av(p, v), rtol=0, atol=0)
    torch.testing.assert_close(av(p, v), p @ v, rtol=0, atol=0.02 * float(v.abs().max()))
    torch.testing.assert_close(qk(q, k.transpose(2, 3)), q @ k.transpose(2, 3), rtol=0, atol=0.1)


def test_incremental_decoding_with_int8_caches_and_scales_matches_teacher_forcing():
    model = _tiny()
    prepare(model, QuantConfig(ranges="runtime"))
    convert(model)
    assert model.cache_dtype == torch.int8 and model.cache_scales
    src, tgt = torch.tensor([[5, 17, 33, 8, 3]]), torch.tensor([[2, 119, 12, 40, 7]])
    with torch.no_grad():
        full = model(src, tgt)
        (cache, history), cross = model.empty_cache(1), model.cross_kv(model.encode(src))
        assert [c.dtype for c in cross] == [torch.int8, torch.float32] and cross[1].shape[-1] == 1
        for t in range(tgt.shape[1]):
            logits, new_kv = model.decode_step(tgt[:, t:t + 1], torch.tensor([t]), cache, history, cross, src)
            assert len(new_kv) == 4 * TINY.decoder_layers  # keys and values, then their scales
            cache, history = model.append_rows(cache, history, new_kv)
            torch.testing.assert_close(logits, full[:, t], rtol=0, atol=1e-4)


def test_convert_stores_int8_weights_and_ties_the_embedding():
    model = _tiny()
    prepare(model, QuantConfig(bits=6, ranges="runtime"))
    reference = model.decoder_layers[0].ffn.fc1.weight.detach().clone()
    convert(model)
    fc1 = model.decoder_layers[0].ffn.fc1
    assert fc1.w_q.dtype == torch.int8 and int(fc1.w_q.abs().max()) == 31 and not hasattr(fc1, "weight")
    torch.testing.assert_close(fc1.w_q.float() * fc1.w_scale, reference, atol=float(fc1.w_scale.max()) / 2, rtol=0)
    assert model.lm_head.w_q is model.embed_tokens.w_q


def test_custom_ops_match_the_training_fake_quant():
    x = torch.randn(4, 7, 16) * 3
    scale = torch.tensor(0.05)
    exported_form = ops.dequantize(ops.quantize(x, scale, 127), scale)
    torch.testing.assert_close(exported_form, ops.fake_quant(x, scale, 127))
    q, s = ops.quantize_dynamic(x, 31, -2)
    assert s.shape == (4, 1, 16) and int(q.abs().max()) == 31


@pytest.mark.parametrize("method", ["max", "percentile", "mse"])
def test_observer_clip_methods(method):
    obs = Observer(seed=0)
    x = torch.randn(1 << 16)
    x[0] = 40.0  # one outlier
    obs.update(x)
    clip = obs.clip(method, 127, 99.9)
    if method == "max":
        assert clip == pytest.approx(40.0)
    else:
        assert 2.0 < clip < 20.0  # the outlier is clipped


def test_calibration_sets_scales_from_data():
    model = _tiny()
    qcfg = QuantConfig(ranges="calibrate", calibration="max")
    prepare(model, qcfg)
    tok = Tokenizer(MODEL_DIR / "spm.model")
    src = (DATA_DIR / "train.en").read_text().splitlines()[:16]
    tgt = (DATA_DIR / "train.de").read_text().splitlines()[:16]
    scales = calibrate(model, qcfg, tok, src, tgt)
    sites = matmul_sites(model)
    two_inputs = sum(1 for n in sites if n.endswith(("qk", "av")))
    assert len(scales) == len(sites) + two_inputs  # QK^T and softmax·V quantize both inputs
    probs = [s for n, s in scales.items() if n.endswith("av.a_act")]
    assert probs and all(0 < s <= 1.0 / 127 + 1e-6 for s in probs)  # softmax outputs lie in [0, 1]
    assert all(q.observer is None for q in act_quantizers(model).values())


def test_quantized_checkpoint_round_trip(tmp_path):
    model = _tiny()
    qcfg = QuantConfig(ranges="learned")
    prepare(model, qcfg)
    for q in act_quantizers(model).values():
        q.set_scale(0.02)
    convert(model)
    save_quantized(model, qcfg, tmp_path / "q", Tokenizer(MODEL_DIR / "spm.model"), {"note": "test"})
    loaded, loaded_cfg = load_quantized(tmp_path / "q")
    assert loaded_cfg.bits == 8 and loaded_cfg.ranges == "learned"
    src = torch.randint(4, 8000, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(src), model.encode(src))


def test_learned_ranges_missing_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="int8mt qat"):
        quantized_model(tmp_path, QuantConfig(ranges="learned"), DATA_DIR)


def test_shipped_learned_models_load():
    for bits in (8, 6):
        model, qcfg = load_quantized(MODEL_DIR / f"qat-int{bits}")
        assert qcfg.bits == bits
        assert int(model.lm_head.w_q.abs().max()) == 2 ** (bits - 1) - 1


def test_qat_runs_a_fraction_of_an_epoch_and_refuses_no_epoch():
    batches = [[i] for i in range(10)]
    assert scheduled_batches(batches, 1) == batches and scheduled_batches(batches, 2) == batches * 2
    assert scheduled_batches(batches, 0.25) == batches[:2] and scheduled_batches(batches, 0.01) == batches[:1]
    assert scheduled_batches(batches, 1.5) == batches + batches[:5]
    for epochs in (0, -1, float("nan"), float("inf")):
        with pytest.raises(UserError, match="epochs must be a number above 0"):
            QATConfig(epochs=epochs)
