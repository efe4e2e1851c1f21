"""``int8mt bench BUNDLE``: the bundle against PyTorch eager on the same sentences, FP32 and, against an INT8
bundle, PyTorch's dynamic INT8."""
import json
import warnings

import torch

from int8mt.cli import main
from int8mt.interface.bench import pytorch_dynamic_int8
from int8mt.model.checkpoint import load_model_dir
from int8mt.model.generate import greedy_decode

from .conftest import edit_manifest


def test_pytorch_dynamic_int8_quantizes_every_linear_layer_of_a_copy(tiny_model_dir):
    model = load_model_dir(tiny_model_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (none of PyTorch's deprecation notices reach the user)
        quantized = pytorch_dynamic_int8(model)
    linear = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linear) == 10 * model.cfg.decoder_layers + 6 * model.cfg.encoder_layers + 1  # (+ the logits)
    modules = dict(quantized.named_modules())
    assert all(isinstance(modules[name], torch.ao.nn.quantized.dynamic.Linear) for name in linear)
    assert not any(type(m) is torch.nn.Linear for m in quantized.modules())
    assert all(type(m) is torch.nn.Linear for name, m in model.named_modules() if name in linear)  # (a copy)
    src = torch.tensor([[9, 21, 6, 29, 165, 95, 3]])
    tgt = torch.tensor([[model.cfg.decoder_start_id, 17, 230, 41]])
    with torch.no_grad():
        exact, approximate = model(src, tgt), quantized(src, tgt)
    assert not torch.equal(exact, approximate)
    assert torch.corrcoef(torch.stack([exact.flatten(), approximate.flatten()]))[0, 1] > 0.99
    assert len(greedy_decode(quantized, src, 6)[0]) == 6


def test_bench_rows_against_pytorch(tiny_model_dir, bundle_copy, tmp_path, capsys):
    """An FP32 bundle against PyTorch FP32; labelled INT8, PyTorch's dynamic INT8 runs too."""
    for scheme, pytorch_rows in (("fp32", ["FP32"]), ("int8", ["FP32", "dynamic INT8"])):
        edit_manifest(bundle_copy, lambda manifest: manifest["quantization"].update(scheme=scheme))
        out = tmp_path / f"{scheme}.json"
        assert main(["bench", str(bundle_copy), "--model", str(tiny_model_dir), "--sentences", "6",
                     "--batch-sizes", "1,3", "--beam", "2", "--json", str(out)]) == 0
        rows = json.loads(out.read_text())
        version = torch.__version__.split("+")[0]
        expected = [("int8mt bundle", "greedy", 1), ("int8mt bundle", "greedy", 3), ("int8mt bundle", "beam 2", 3)]
        expected += [(f"PyTorch {version} {name}", "greedy", batch) for name in pytorch_rows for batch in (1, 3)]
        assert [(r["backend"], r["search"], r["batch_size"]) for r in rows] == expected
        assert all(r["sentences"] == 6 and r["sentences_per_second"] > 0 for r in rows)
        assert f"| PyTorch {version} {pytorch_rows[-1]}" in capsys.readouterr().out
