"""Smoke tests of the benchmarks' --quick modes (peers are skipped when not installed)."""
import pytest

from bench import infer, train


@pytest.mark.slow  # runs the benchmark harness end to end (10-30 s each)
def test_train_quick_measures_keras_vit_and_reports_ratios(capsys):
    results = train.main(["--quick", "--cases", "peak,tf-xla,notebook,timm"])
    by = {r["case"]: r for r in results}
    assert by["peak"]["peak_fp32"] > 0
    r = by["tf-xla"]
    assert "error" not in r, r
    assert r["img_s"]["median"] > 0 and r["peak_rss_mb"] > 0
    assert 0 < r["share_of_peak"] < 1.5
    notebook = by["notebook"]  # compile(optimizer, loss) + fit on tf.data, no other argument
    assert "error" not in notebook, notebook
    assert notebook["jit"] == "True" and notebook["img_s"]["median"] > 0
    if "img_s" in by["timm"]:
        assert r["x_timm"] > 0
    else:
        assert "skipped" in by["timm"]
    assert "training throughput" in capsys.readouterr().out


@pytest.mark.slow  # runs the benchmark harness end to end (10-30 s each)
def test_infer_quick_runs_keras_and_onnx_and_agrees(capsys):
    results = infer.main(["--quick", "--cases", "keras-xla,onnx,timm-onnx"])
    by = {r["case"]: r for r in results}
    for case in ("keras-xla", "onnx"):
        assert "error" not in by[case], by[case]
        assert by[case]["latency_ms"]["median"] > 0
        assert by[case]["top1_agree"] == 1.0 and by[case]["max_abs_diff"] < 1e-3
    assert "img_s" not in by["timm-onnx"]
    assert "latency_ms" in by["timm-onnx"] or "skipped" in by["timm-onnx"]
    assert "inference" in capsys.readouterr().out


@pytest.mark.slow  # profiles a small model in a fresh process (about 30 s)
def test_profile_train_splits_a_step_into_gemms_and_fused_work(tmp_path):
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "bench.profile_train", "--variant", "Ti/16", "--image-size", "64",
                           "--batch-size", "4", "--steps", "2", "--without", "gelu-gradient"],
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "Ti/16, 64 px, batch 4" in out
    assert "weight GEMMs" in out and "XLA-fused element-wise" in out  # fusible clustering was on
    assert "Gelu" in out.split("by model part:")[1]  # the fusions are traced back to the model's ops


def test_unknown_case_is_one_clear_error():
    with pytest.raises(SystemExit, match="unknown case"):
        train.main(["--quick", "--cases", "nope"])


@pytest.mark.slow  # runs the benchmark harness end to end (10-30 s each)
def test_gpu_bench_runs_without_tensorflow(tmp_path):
    """bench/gpu.py is for machines with JAX and torch but no TensorFlow: it must never import it."""
    import json
    import os
    import subprocess
    import sys

    blocker = tmp_path / "site" / "tensorflow"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('TensorFlow is not on this machine')\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=f"{tmp_path / 'site'}{os.pathsep}{root}")
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu", "--quick", "--device", "cpu",
                           "--cases", "peak,keras-jax", "--json", str(out)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    by = {r["case"]: r for r in json.loads(out.read_text())["results"]}
    assert "error" not in by["keras-jax"], by["keras-jax"]
    assert by["keras-jax"]["img_s"]["median"] > 0
    assert by["peak"]["peak_bf16_tflops"] > 0 and 0 < by["keras-jax"]["mfu_measured_peak"] < 1.5


@pytest.mark.slow  # runs the benchmark harness end to end (about 30 s)
def test_data_quick_measures_keras_vit_beside_torchvision(tmp_path, capsys):
    from bench import data as bdata

    results = bdata.main(["--quick", "--augment", "randaugment", "--work-dir", str(tmp_path)])
    by = {r["case"]: r for r in results}
    for case in ("keras-vit:list", "keras-vit:randaugment"):
        assert "error" not in by[case], by[case]
        assert by[case]["img_s"]["median"] > 0 and by[case]["img_cpu_s"]["median"] > 0
    assert by["keras-vit:list"]["images"] == 2000 and by["keras-vit:randaugment"]["images"] == 32  # 63 train files
    for case in ("torchvision:list", "torchvision:randaugment"):
        assert "img_s" in by[case] or "skipped" in by[case]
    assert "input pipelines" in capsys.readouterr().out
