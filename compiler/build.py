"""Build a bundle: ``tvm.compile`` + ``export_library`` to a ``.so``, the tokenizer and a manifest."""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import tvm

from int8mt import __version__
from int8mt.model.checkpoint import load_model_dir
from int8mt.runtime.bundle import BUNDLE_FORMAT, ENTRY_POINTS, LIBRARY_FILE, MANIFEST_FILE, TOKENIZER_FILE, sha256
from int8mt.targets import get_preset

from .frontend import export_to_relax
from .pipeline import int8mt_pipeline

def build_bundle(model_dir: Path, target_name: str, out_dir: Path, dump_dir: Path | None = None) -> dict:
    """Compile the model in ``model_dir`` for the target preset ``target_name`` into the bundle ``out_dir``."""
    preset = get_preset(target_name)
    model = load_model_dir(model_dir)
    tokenizer = Path(model_dir) / TOKENIZER_FILE
    if not tokenizer.is_file():
        raise ValueError(f"{model_dir} has no tokenizer ({TOKENIZER_FILE}); a bundle needs one to translate text")
    target = tvm.target.Target(preset.target)
    t0 = time.time()
    print("torch.export and import into Relax", file=sys.stderr)
    mod = export_to_relax(model)
    print(f"compiling for {target_name} ({json.dumps(preset.target)})", file=sys.stderr)
    executable = tvm.compile(mod, target=target, relax_pipeline=int8mt_pipeline(target, dump_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    library = out_dir / LIBRARY_FILE
    executable.export_library(str(library))
    shutil.copyfile(tokenizer, out_dir / TOKENIZER_FILE)
    manifest = {
        "format": BUNDLE_FORMAT,
        "int8mt_version": __version__,
        "tvm_version": tvm.__version__,
        "target": {"preset": preset.name, "tvm": preset.target, "required_features": list(preset.required_features)},
        "quantization": "fp32",
        "entry_points": list(ENTRY_POINTS),
        "model": model.cfg.to_dict(),
        "files": {LIBRARY_FILE: sha256(library), TOKENIZER_FILE: sha256(out_dir / TOKENIZER_FILE)},
        "compile_seconds": round(time.time() - t0, 1),
    }
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {out_dir} ({library.stat().st_size / 1e6:.1f} MB .so) in {manifest['compile_seconds']} s",
          file=sys.stderr)
    return manifest
