"""Packaging: the wheel holds keras_vit.export and keras_vit.cli; vitcli stays light."""
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VITCLI = os.path.join(os.path.dirname(sys.executable), "vitcli")


def _run(args, **kw):
    return subprocess.run(args, capture_output=True, text=True, timeout=kw.pop("timeout", 300), cwd=kw.pop("cwd", ROOT), **kw)


def _build_wheel(tmp_path):
    """The wheel of a copy of the source tree (no venv, runs or caches), built without isolation."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".venv", ".venv-*", "amx-out*", ".git", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"))
    proc = _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist")],
                cwd=src)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "absent from the `packages` configuration" not in proc.stdout + proc.stderr  # every folder declared
    (wheel,) = (tmp_path / "dist").glob("keras_vit-*.whl")
    return wheel


def test_wheel_holds_export_and_cli(tmp_path):
    wheel = _build_wheel(tmp_path)
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
    for imports in ("keras, keras_vit", "keras_vit, keras"):  # keras_vit first: registered when Keras comes
        code = (f"import numpy as np, {imports}\n"
                f"m = keras.saving.load_model({str(path)!r})\n"
                "print(type(m).__name__, m(np.zeros((1, 32, 32, 3), 'float32')).shape)")
        proc = _run([sys.executable, "-c", code], cwd="/")
        assert proc.returncode == 0, (imports, proc.stderr[-2000:])
        assert "VisionTransformer (1, 3)" in proc.stdout, imports


@pytest.mark.skipif(not os.path.exists(VITCLI), reason="console script not installed")
def test_output_that_cannot_be_written_is_one_line():
    """stdout on a full disk: one line and status 1, from click's own --help and --version too (was: a
    traceback); stdout closed (`>&-`): the command runs, its output goes nowhere (was: train crashed)."""
    for args in (["--version"], ["--help"], ["models"]):
        with open("/dev/full", "w") as full:
            proc = subprocess.run([VITCLI, *args], stdout=full, stderr=subprocess.PIPE, text=True, timeout=300)
        assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
            "Error: No space left on device while writing the output"], (args, proc.stderr)
    proc = subprocess.run(f"{VITCLI} models >&-", shell=True, stderr=subprocess.PIPE, text=True, timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr


def _readme_venv_mb(extra: str) -> float:
    """The venv size the README's install table gives for `extra` (its "| `[cpu]` | ... | N MB |" row)."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    m = re.search(r"^\| `\[" + extra + r"\]`[^\n]*?\| ([\d,]+) MB \|", readme, re.M)
    assert m, f"README.md has no install-table row for [{extra}]"
    return float(m[1].replace(",", ""))


@pytest.mark.slow
def test_fresh_venv_with_the_cpu_extra_trains_and_exports(tmp_path):
    """A user's first hour: the wheel with [cpu] alone, in a fresh venv (what `make demo` installs), trains
    on the offline digits and exports a verified ONNX file; its size is the one the README gives."""
    wheel = _build_wheel(tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"{wheel}[cpu]"], timeout=1800)
    assert pip.returncode == 0, pip.stderr[-3000:]
    listed = _run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"]).stdout.lower()
    for absent in ("torch==", "jax==", "pytest==", "tensorflow-datasets==", "jupyter"):
        assert absent not in listed, f"{absent} was installed by [cpu]"
    assert "onnxruntime==" in listed
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    vitcli = str(venv / "bin" / "vitcli")
    train = _run([vitcli, "train", "--dataset", "digits", "--epochs", "1"], cwd=work, env=env, timeout=900)
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-2000:]
    export = _run([vitcli, "export", "--format", "onnx"], cwd=work, env=env, timeout=900)
    assert export.returncode == 0, export.stdout[-2000:] + export.stderr[-2000:]
    assert list((work / "runs" / "latest").glob("*.onnx")) or list(work.glob("**/*.onnx"))
    size_mb = float(_run(["du", "-sm", str(venv)]).stdout.split()[0])  # as the README's figures were measured
    print(f"fresh venv with [cpu]: {size_mb:,.0f} MB")
    want = _readme_venv_mb("cpu")
    assert abs(size_mb - want) <= 0.15 * want, f"[cpu] venv is {size_mb:,.0f} MB; README.md says {want:,.0f} MB"
