"""The Marian loader against a small random MarianMTModel built with transformers."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from int8mt.model.converters.marian import load_marian  # noqa: E402


@pytest.fixture(scope="module")
def marian_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.MarianConfig(
        vocab_size=120, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        pad_token_id=119, eos_token_id=0, decoder_start_token_id=119, activation_function="swish")
    model = transformers.MarianMTModel(cfg).eval()
    with torch.no_grad():  # a non-zero logits bias, so that the test sees whether it is loaded
        model.final_logits_bias.normal_()
    out = tmp_path_factory.mktemp("marian")
    model.save_pretrained(out)
    return out, model


def _assert_same_logits(ours, hf) -> None:
    """Teacher-forced logits of a padded batch (pad id 119) agree with the transformers model's."""
    src = torch.tensor([[5, 17, 33, 8, 0], [9, 4, 0, 119, 119]])
    tgt = torch.tensor([[119, 12, 40, 7], [119, 3, 66, 2]])
    with torch.no_grad():
        expected = hf(input_ids=src, attention_mask=(src != 119).long(), decoder_input_ids=tgt).logits
        got = ours(src, tgt)
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


def test_logits_match_transformers(marian_dir):
    path, hf = marian_dir
    ours = load_marian(path)
    _assert_same_logits(ours, hf)


@pytest.mark.parametrize("variant", [
    {"scale_embedding": False, "activation_function": "gelu"},
    {"activation_function": "relu", "normalize_before": True},  # transformers runs Marian post-norm regardless
    {"share_encoder_decoder_embeddings": False, "tie_word_embeddings": False},
    {"share_encoder_decoder_embeddings": False, "tie_word_embeddings": True},
], ids=["unscaled-gelu", "relu-normalize-before", "separate-untied", "separate-tied"])
def test_config_variants_match_transformers(tmp_path, variant):
    torch.manual_seed(1)
    cfg = transformers.MarianConfig(
        vocab_size=120, d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=32,
        pad_token_id=119, eos_token_id=0, decoder_start_token_id=119, **variant)
    hf = transformers.MarianMTModel(cfg).eval()
    hf.save_pretrained(tmp_path)
    ours = load_marian(tmp_path)
    assert ours.cfg.shared_embeddings == cfg.share_encoder_decoder_embeddings
    assert ours.cfg.tied_output == cfg.tie_word_embeddings
    _assert_same_logits(ours, hf)


def test_incremental_decoding_matches_teacher_forcing(marian_dir):
    ours = load_marian(marian_dir[0])
    src = torch.tensor([[5, 17, 33, 8, 0]])
    tgt = torch.tensor([[119, 12, 40, 7]])
    with torch.no_grad():
        full = ours(src, tgt)
        (cache, history), cross = ours.empty_cache(1), ours.cross_kv(ours.encode(src))
        for t in range(tgt.shape[1]):
            logits, new_kv = ours.decode_step(tgt[:, t:t + 1], torch.tensor([t]), cache, history, cross, src)
            cache, history = ours.append_rows(cache, history, new_kv)
            assert torch.allclose(logits, full[:, t], atol=1e-5)


def test_rejects_other_architectures(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bart"}))
    with pytest.raises(ValueError, match="model_type"):
        load_marian(tmp_path)


def test_missing_weights_file(marian_dir, tmp_path):
    (tmp_path / "config.json").write_text((marian_dir[0] / "config.json").read_text())
    with pytest.raises(ValueError, match="model.safetensors"):
        load_marian(tmp_path)
