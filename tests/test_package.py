"""Packaging: the wheel holds keras_vit.export and keras_vit.cli; vitcli stays light."""
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VITCLI = os.path.join(os.path.dirname(sys.executable), "vitcli")


def _run(args, **kw):
    return subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=kw.pop("cwd", ROOT), **kw)


def test_wheel_holds_export_and_cli(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".venv", ".git", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"))
    proc = _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist")],
                cwd=src)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "absent from the `packages` configuration" not in proc.stdout + proc.stderr  # every folder declared
    (wheel,) = (tmp_path / "dist").glob("keras_vit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("keras_vit/__init__.py", "keras_vit/vit.py", "keras_vit/layers/__init__.py", "keras_vit/layers/attention.py",
                   "keras_vit/export/__init__.py", "keras_vit/cli/__init__.py", "keras_vit/cli/main.py",
                   "keras_vit/assets/imagenet1k.txt", "keras_vit/assets/imagenet21k.txt"):
        assert module in names, module
    assert not any(n.startswith(("export/", "cli/", "tests/")) for n in names)
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    assert not any("torch" in line and "extra" not in line for line in requires)
    assert "entry_points.txt" in " ".join(names)


def test_installed_package_imports_export_and_cli():
    code = ("import keras_vit.export, keras_vit.cli.main, os; "
            "print(os.path.dirname(keras_vit.export.__file__), os.path.dirname(keras_vit.cli.main.__file__))")
    proc = _run([sys.executable, "-c", code], cwd="/")
    assert proc.returncode == 0, proc.stderr
    export_dir, cli_dir = proc.stdout.split()
    assert os.path.basename(export_dir) == "export" and os.path.basename(cli_dir) == "cli"


def test_vitcli_help_does_not_import_tensorflow():
    code = ("import sys; from keras_vit.cli.main import cli\n"
            "try:\n    cli(['--help'], prog_name='vitcli')\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "heavy = [m for m in ('tensorflow', 'keras', 'jax', 'torch') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    proc = _run([sys.executable, "-c", code])
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout
    assert "Usage: vitcli" in proc.stdout


@pytest.mark.skipif(not os.path.exists(VITCLI), reason="console script not installed")
def test_vitcli_version_and_models():
    import keras_vit

    proc = _run([VITCLI, "--version"])
    assert proc.returncode == 0 and keras_vit.__version__ in proc.stdout
    proc = _run([VITCLI, "models"])
    assert proc.returncode == 0, proc.stderr
    assert "86,567,656" in proc.stdout and "98,659,112" in proc.stdout and "H/14" in proc.stdout
    bad = _run([VITCLI, "models", "--image-size", "0"])
    assert bad.returncode != 0 and "Traceback" not in bad.stderr


def test_keras_load_model_after_import_keras_vit(tmp_path):
    """A notebook that imports Keras, then keras_vit, reloads a .keras file with Keras' own loader."""
    path = tmp_path / "m.keras"
    code = ("import sys, numpy as np, keras, keras_vit\n"
            "m = keras_vit.ViT(variant='Ti/16', image_size=32, patch_size=8, hidden_size=32, num_layers=1,\n"
            "                  num_heads=2, mlp_dim=64, num_classes=3)\n"
            f"m.save({str(path)!r})\n")
    proc = _run([sys.executable, "-c", code], cwd="/")
    assert proc.returncode == 0, proc.stderr[-2000:]
    code = ("import numpy as np, keras, keras_vit\n"
            f"m = keras.saving.load_model({str(path)!r})\n"
            "print(type(m).__name__, m(np.zeros((1, 32, 32, 3), 'float32')).shape)")
    proc = _run([sys.executable, "-c", code], cwd="/")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "VisionTransformer (1, 3)" in proc.stdout
