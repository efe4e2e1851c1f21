"""`int8mt train` on a small slice of the data: it writes a loadable model directory and its record."""
import json

from int8mt.cli import main
from int8mt.model.checkpoint import load_model_dir

from ..conftest import DATA_DIR


def test_train_writes_model_and_record(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for split, lines in (("train", 400), ("val", 20), ("test_2016_flickr", 20)):
        for lang in ("en", "de"):
            text = (DATA_DIR / f"{split}.{lang}").read_text(encoding="utf-8").splitlines()[:lines]
            (data / f"{split}.{lang}").write_text("\n".join(text) + "\n", encoding="utf-8")
    (tmp_path / "cfg.yaml").write_text(
        "paths: {data: data, runs: runs}\n"
        "model: {vocab_size: 300, d_model: 32, encoder_layers: 1, decoder_layers: 1, heads: 2, ffn_dim: 64}\n"
        "train: {epochs: 2, batch_tokens: 2000, warmup_steps: 5, average_best: 2}\n")
    assert main(["train", "--config", str(tmp_path / "cfg.yaml"), "-o", str(tmp_path / "model")]) == 0
    model = load_model_dir(tmp_path / "model")
    assert model.cfg.vocab_size == 300 and (tmp_path / "model" / "spm.model").is_file()
    record = json.loads((tmp_path / "model" / "training.json").read_text())
    assert record["epochs_run"] == 2 and len(record["history"]) == 2
    assert record["history"][1]["train_loss"] < record["history"][0]["train_loss"]
    assert "test_2016_flickr_bleu_greedy" in record
