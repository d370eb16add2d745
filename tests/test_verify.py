"""verify(): the report, thresholds by precision and overrides, failure reporting, image sources."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
from export_helpers import small_model

from keras_vit.export import (  # noqa: E402
    THRESHOLDS,
    ExportError,
    Runner,
    export_verified,
    failed_path,
    format_table,
    report_path,
    to_onnx,
    verify,
)
from keras_vit.export.images import load_images  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = small_model("learned")
    path = to_onnx(model, tmp_path_factory.mktemp("verify") / "m.onnx")
    return model, path


def test_report_is_written_beside_the_file(exported):
    model, path = exported
    report = verify(model, path, num_images=10, batch_size=4)
    on_disk = json.loads(open(report_path(path)).read())
    assert report_path(path) == path + ".report.json" == report["report_path"]
    for key in ("num_images", "max_abs_diff", "mean_abs_diff", "top1_agreement", "top5_agreement",
                "latency_ms_per_batch", "checks", "runtime", "sha256", "status", "precision"):
        assert key in on_disk, key
    assert on_disk["num_images"] == 10 and on_disk["passed"] and on_disk["precision"] == "fp32"
    assert on_disk["latency_ms_per_batch"]["keras"] > 0 and on_disk["latency_ms_per_batch"]["exported"] > 0
    assert {c["metric"] for c in on_disk["checks"]} == set(THRESHOLDS["fp32"])
    table = format_table(report)
    assert "top-1 agreement" in table and "passed" in table


def test_a_zero_head_model_passes_but_the_report_says_it_proves_nothing(tmp_path):
    """An untrained model (zero-initialised head) gives the same logits for every image: the file agrees,
    but so would another model's file with such a head. The report passes with a warning instead of
    claiming proof (status, warnings, the table); a model whose outputs vary gets neither."""
    import keras_vit

    untrained = keras_vit.ViT("Ti/4", image_size=32, num_classes=10, hidden_size=32, num_heads=2, mlp_dim=64,
                              num_layers=1)
    path = to_onnx(untrained, tmp_path / "zero.onnx")
    for model in (untrained, keras_vit.ViT(config=untrained.vit_config)):  # the second: other encoder weights
        report = verify(model, path, num_images=6, write_report=False)
        assert report["passed"] and report["top1_agreement"] == 1.0
        assert report["status"].startswith("passed, but proves nothing")
        assert report["warnings"] and "zero-initialised head" in report["warnings"][0]
        assert "warning" in format_table(report)


def test_outputs_that_vary_get_no_warning(exported):
    model, path = exported
    report = verify(model, path, num_images=6, write_report=False)
    assert report["status"] == "passed" and "warnings" not in report


def test_failed_threshold_is_reported_with_its_margin_and_the_file_kept(exported):
    model, path = exported
    report = verify(model, path, num_images=4, thresholds={"max_abs_diff": 0.0})
    assert not report["passed"] and report["status"] == "FAILED verification"
    assert len(report["failures"]) == 1 and report["failures"][0].startswith("max_abs_diff")
    assert "threshold 0" in report["failures"][0] and "off by" in report["failures"][0]
    assert json.loads(open(report_path(path)).read())["passed"] is False
    assert Runner(path)(np.zeros((1, 32, 32, 3), np.float32)).shape == (1, 10)  # file still there, still runs


def test_precision_thresholds_and_bad_arguments(exported, tmp_path):
    model, path = exported
    assert THRESHOLDS["fp32"] == {"max_abs_diff": 1e-4, "top1_agreement": 1.0}
    assert THRESHOLDS["fp16"]["top1_agreement"] == 0.99 and THRESHOLDS["int8"]["top1_agreement"] == 0.97
    report = verify(model, path, num_images=4, precision="int8", write_report=False)
    assert [c["metric"] for c in report["checks"]] == ["top1_agreement"]
    with pytest.raises(ExportError, match="unknown threshold"):
        verify(model, path, num_images=4, thresholds={"speed": 1.0}, write_report=False)
    with pytest.raises(ExportError, match="precision must be one of"):
        verify(model, path, num_images=4, precision="int4", write_report=False)
    (tmp_path / "m.pt").write_bytes(b"x")
    with pytest.raises(ExportError, match="expected .onnx, .tflite or a SavedModel folder"):
        verify(model, tmp_path / "m.pt")
    with pytest.raises(ExportError, match="does not exist"):
        verify(model, tmp_path / "missing.onnx")


def test_image_sources(tmp_path):
    from PIL import Image

    rng = np.random.RandomState(0)
    for i in range(3):
        Image.fromarray(rng.randint(0, 255, (40 + i, 50, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    Image.fromarray(rng.randint(0, 255, (20, 20), dtype=np.uint8)).save(tmp_path / "gray.jpg")
    folder = load_images(f"folder:{tmp_path}", 32, 3, num_images=10)
    assert folder.shape == (4, 32, 32, 3) and folder.dtype == np.float32
    assert folder.min() >= 0 and folder.max() <= 255
    assert load_images(str(tmp_path), (16, 24), 1, num_images=2).shape == (2, 16, 24, 1)
    digits = load_images("digits", 32, num_images=5)
    assert digits.shape == (5, 32, 32, 3) and digits.max() > 100
    photos = load_images("photos", 48, num_images=3)
    assert photos.shape == (3, 48, 48, 3) and photos.std() > 10
    assert load_images(None, 32, num_images=5).shape == (5, 32, 32, 3)
    assert load_images(np.zeros((9, 8, 8, 3)), 32, num_images=4).shape == (4, 32, 32, 3)
    with pytest.raises(ExportError, match="does not exist"):
        load_images(f"folder:{tmp_path / 'nope'}", 32)
    with pytest.raises(ExportError, match="unknown image source|image source"):
        load_images("no-such-dataset", 32)


def test_export_verified_promotes_a_passing_file_and_sets_a_failed_one_aside(exported, tmp_path):
    """The library's write-and-verify call: a passing file reaches the path with its report; a
    failing one (max |diff| <= 0) is kept as NAME.failed.EXT and the good file stays."""
    model, _ = exported
    out = tmp_path / "m.onnx"
    report = export_verified(model, out, num_images=4, plot=False)
    assert report["passed"] and report["file"] == str(out) and report["report_path"] == str(out) + ".report.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.report.json"]
    good = out.read_bytes()
    report = export_verified(model, str(out), num_images=4, thresholds={"max_abs_diff": 0.0}, plot=False)
    assert not report["passed"] and report["file"] == failed_path(out) == str(tmp_path / "m.failed.onnx")
    assert json.loads(open(report_path(failed_path(out))).read())["status"] == "FAILED verification"
    assert out.read_bytes() == good and json.loads(open(report_path(out)).read())["passed"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.failed.onnx", "m.failed.onnx.report.json", "m.onnx",
                                                          "m.onnx.report.json"]


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError])
def test_export_verified_interrupted_leaves_no_temporary_file(exported, tmp_path, monkeypatch, interrupt):
    """Ctrl-C (or an error) during verification: the temporary file is removed, the old file stays."""
    import importlib

    verify_module = importlib.import_module("keras_vit.export.verify")  # the package's `verify` is the function
    model, _ = exported
    out = tmp_path / "m.onnx"
    out.write_bytes(b"the previous export")
    seen = []

    def stop(keras_model, path, **kwargs):
        seen.append(os.path.basename(path))
        raise interrupt("stopped")

    monkeypatch.setattr(verify_module, "measure", stop)
    with pytest.raises(interrupt):
        export_verified(model, out, num_images=4)
    assert seen and seen[0].startswith(".m.onnx.tmp-") and seen[0].endswith(".onnx")
    assert out.read_bytes() == b"the previous export" and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_staging_and_failed_names():
    from keras_vit.export.verified import export_format, staging_path

    assert failed_path("/d/model.int8.opt.onnx") == "/d/model.int8.opt.failed.onnx"
    assert failed_path("/d/m.tflite") == "/d/m.failed.tflite"
    assert failed_path("/d/model.saved_model/") == "/d/model.saved_model.failed"
    tmp = staging_path("/d/m.tflite")
    assert tmp.startswith("/d/.m.tflite.tmp-") and tmp.endswith(".tflite") and f"-{os.getpid()}-" in tmp
    assert staging_path("/d/model.saved_model").startswith("/d/.model.saved_model.tmp-")
    assert [export_format(p) for p in ("a.onnx", "a.tflite", "a.saved_model")] == ["onnx", "tflite", "saved_model"]
    with pytest.raises(ExportError, match="format must be one of onnx, tflite, saved_model; got 'coreml'"):
        export_format("a.onnx", "coreml")


def test_an_export_removes_what_killed_exports_left(tmp_path):
    """SIGKILL (the OOM killer) leaves the staging file, its report and the report's temporary beside the
    output; later exports left them there for good (four kills: six hidden files). An export removes those
    of processes of this host that are gone; a running export's (another pid alive) and other names stay."""
    import subprocess

    from keras_vit.export.verified import remove_stale_staging, staging_path

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = tmp_path / "m.onnx"
        mine = os.path.basename(staging_path(out))
        dead = mine.replace(f"-{os.getpid()}-", f"-{gone.pid}-")
        running = mine.replace(f"-{os.getpid()}-", f"-{alive.pid}-")
        other = mine.replace(".m.onnx.", ".n.onnx.").replace(f"-{os.getpid()}-", f"-{gone.pid}-")
        left = [dead, dead + ".report.json", "." + dead + ".report.png.0a1b2c3d.tmp.png", running, mine, other,
                ".m.onnx.tmp-d7e567e8.onnx"]  # the last: a name from before the owner was in it
        for name in left:
            (tmp_path / name).write_bytes(b"x")
        (tmp_path / dead.replace(".onnx.tmp-", ".saved_model.tmp-")).mkdir()  # another output's folder: stays
        assert sorted(remove_stale_staging(out)) == sorted(left[:3])
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            left[3:] + [dead.replace(".onnx.tmp-", ".saved_model.tmp-")])
    finally:
        alive.kill()
        alive.wait()
