"""Installing the runtime alone (``pip install .``, no extras) gives a working ``int8mt translate`` without
torch, xgboost, psutil or cloudpickle."""
import subprocess
import sys

from .conftest import ROOT


def test_runtime_only_install_translates_an_existing_bundle(tiny_bundle, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(ROOT)], check=True)
    python = str(venv / "bin" / "python")
    absent = subprocess.run([python, "-c", "import importlib.util as u; print([m for m in "
                             "('torch', 'xgboost', 'psutil', 'cloudpickle', 'safetensors') if u.find_spec(m)])"],
                            capture_output=True, text=True, check=True)
    assert absent.stdout.strip() == "[]"
    out = subprocess.run([str(venv / "bin" / "int8mt"), "translate", str(tiny_bundle), "A dog.", "Two cats."],
                         capture_output=True, text=True, check=True)
    assert len(out.stdout.splitlines()) == 2
