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
    from keras_vit import precision  # graph mode on an AMX CPU (layers.fusion.float32_scoped), else whole-step XLA

    amx = precision.detect_hardware("tensorflow").cpu_bf16 == "amx_bf16"
    assert notebook["jit"] == str(not amx) and notebook["img_s"]["median"] > 0
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


@pytest.mark.slow  # exports and times three TFLite files (about 15 s)
def test_infer_quick_times_the_tflite_files_each_from_its_own_export():
    results = infer.main(["--quick", "--cases", "tflite,tflite-dynamic,tflite-int8"])
    by = {r["case"]: r for r in results}
    for case in ("tflite", "tflite-dynamic", "tflite-int8"):
        assert "error" not in by[case], by[case]
        assert by[case]["latency_ms"]["median"] > 0
    assert by["tflite"]["max_abs_diff"] < 1e-4  # float32
    # int8 weights with float activations: close to the float file, unlike the calibrated full-int8 one
    assert 1e-4 < by["tflite-dynamic"]["max_abs_diff"] < 0.2 and by["tflite-dynamic"]["top1_agree"] == 1.0


@pytest.mark.slow  # profiles a small model in a fresh process (about 30 s)
def test_profile_train_splits_a_step_into_gemms_and_fused_work(tmp_path):
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "bench.profile_train", "--variant", "Ti/16", "--image-size", "64",
                           "--batch-size", "4", "--steps", "2", "--without", "gelu-gradient",
                           "--json", str(tmp_path / "p.json")],
                          cwd=root, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["p.json"]  # its HLO dump and trace (50+ MB) were left in /tmp
    out = proc.stdout
    assert "Ti/16, 64 px, batch 4" in out
    assert "weight GEMMs" in out and "XLA-fused element-wise" in out  # fusible clustering was on
    assert "Gelu" in out.split("by model part:")[1]  # the fusions are traced back to the model's ops
    import json

    saved = json.loads((tmp_path / "p.json").read_text())  # what bench.amx's profile stage reads
    assert saved["info"]["variant"] == "Ti/16" and saved["info"]["without"] == "gelu-gradient" and saved["step_ms"] > 0
    assert saved["kinds_ms"]["weight GEMMs (oneDNN MatMul, forward and backward)"] > 0
    assert any("Gelu" in part for part in saved["fusion_parts_ms"])
    assert "Other TF ops by type: " in out and all(ms >= 0 for ms in saved["other_ops_ms"].values())


def test_unknown_case_is_one_clear_error():
    with pytest.raises(SystemExit, match="unknown case"):
        train.main(["--quick", "--cases", "nope"])


@pytest.mark.parametrize("argv,message", [
    (["--steps", "0"], "--steps must be at least 1, got 0"),
    (["--repeats", "0", "--cases", "default"], "--repeats must be at least 1, got 0"),
    (["--variant", "X/99"], "unknown variant 'X/99'"),
    (["--image-size", "30"], "image_size 30x30 is not divisible by the patch size 16x16"),
    (["--json", "/nonexistent-folder/x.json"], "--json /nonexistent-folder/x.json: folder /nonexistent-folder does not"),
])
def test_bad_bench_options_are_one_line_before_any_case(argv, message):
    """A bad count or variant ran every case in its own process to an 'exit 1' row and status 0 (or, for
    bench.train_ab --steps 0, trained forever); a --json folder that did not exist lost the figures at the end."""
    with pytest.raises(SystemExit, match=message.replace("(", r"\(")):
        train.main(argv)


def test_train_ab_refuses_zero_steps_and_a_bad_variant_in_one_line():
    """bench.train_ab --steps 0 trained forever; an unknown variant ended in CalledProcessError's traceback."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for argv, line in ((["--steps", "0"], "--steps must be at least 1, got 0"),
                       (["--variant", "X/99"], "unknown variant 'X/99'")):
        proc = subprocess.run([sys.executable, "-m", "bench.train_ab", "--without", "gelu-gradient", *argv], cwd=root,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1].startswith(line)


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


ONEDNN_LOG = """\
onednn_verbose,v1,info,cpu,isa:Intel AVX-512 with float16, Intel DL Boost and bfloat16 support and Intel AMX with \
bfloat16 and 8-bit integer support
onednn_verbose,v1,primitive,info,template:operation,engine,primitive,implementation,prop_kind,memory_descriptors
onednn_verbose,v1,primitive,exec,cpu,matmul,brg_matmul:avx512_core_amx,undef,src:bf16::blocked:ab::f0 \
wei:bf16::blocked:ab::f0 dst:bf16::blocked:ab::f0,attr-scratchpad:user,,1024x1024:1024x1024,0.17
onednn_verbose,v1,primitive,exec,cpu,gemm_api,,undef,src_f32::blocked:ab:f0 wei_f32::blocked:ab:f0 \
dst_f32::blocked:ab:f0,,,1024x1024:1024x1024,34.0
onednn_verbose,v1,graph,exec,cpu,100002,matmul_post_ops,MatMul_0,,in0_f32:0:strided:undef:2048x2048:2048s1 \
in1_f32:1:strided:undef:2048x2048:2048s1,fpm:strict,dnnl_backend,1.5
some other line naming amx
"""


def test_onednn_verbose_names_the_kernels_per_dtype():
    from bench.gemm_ways import kernels_by_dtype

    assert kernels_by_dtype(ONEDNN_LOG) == {"bf16": ["matmul:brg_matmul:avx512_core_amx"],
                                            "f32": ["gemm_api", "graph:matmul_post_ops"]}
    assert kernels_by_dtype("no oneDNN here\n") == {}


def test_onednn_verbose_times_each_kernel_while_each_dtype_ran():
    from bench.gemm_ways import PHASE_MARK, kernel_ms_by_phase, time_shares

    reorder = ("onednn_verbose,v1,primitive,exec,cpu,reorder,jit:uni,undef,src:f32::blocked:ab::f0 "
               "dst:bf16::blocked:BA16a32b2a::f0,,,1024x1024,0.08\n")
    times = kernel_ms_by_phase(PHASE_MARK + "bf16\n" + ONEDNN_LOG + reorder + PHASE_MARK + "fp32\n" + reorder)
    assert times == {"bf16": {"matmul:brg_matmul:avx512_core_amx": 0.17, "gemm_api": 34.0,
                              "graph:matmul_post_ops": 1.5, "reorder:jit:uni": 0.08},
                     "fp32": {"reorder:jit:uni": 0.08}}
    shares = time_shares({"matmul": 3.0, "reorder": 1.0})
    assert shares == [("matmul", 75.0), ("reorder", 25.0)] and time_shares({}) == []


def test_step_kernels_counts_each_kernel_of_the_logged_steps():
    """bench.step_kernels: only the lines after the mark count, per step, largest first; AMX is named by kernel."""
    from bench.step_kernels import MARK, census

    warmup = ("onednn_verbose,v1,primitive,exec,cpu,matmul,brg_matmul:avx512_core_bf16,undef,src:bf16::blocked:ab::f0,"
              ",,64x64:64x64,9.0\n")
    c = census(warmup + MARK + ONEDNN_LOG + ONEDNN_LOG, steps=2)
    assert c["amx"] is True and c["onednn_ms"] == round(0.17 + 34.0 + 1.5, 2)
    assert c["kinds_ms"] == {"gemm_api": 34.0, "graph": 1.5, "matmul": 0.17}
    assert c["rows"][0] == {"kernel": "gemm_api", "problem": "1024x1024:1024x1024", "calls": 1, "ms": 34.0}
    assert {"kernel": "matmul:brg_matmul:avx512_core_amx", "problem": "1024x1024:1024x1024", "calls": 1,
            "ms": 0.17} in c["rows"]
    assert all(r["problem"] != "64x64:64x64" for r in c["rows"])  # the warm-up's line is before the mark
    assert census(MARK + warmup, steps=1)["amx"] is False


@pytest.mark.slow  # one TensorFlow training process under oneDNN's verbose log (about 25 s)
def test_step_kernels_reads_the_kernels_of_keras_vits_step(tmp_path):
    from bench import step_kernels

    record = step_kernels.main(["--quick", "--cases", "default,timm-bf16-unfused", "--json", str(tmp_path / "k.json")])
    by = {r["case"]: r for r in record["results"]}
    assert "rows" in by["timm-bf16-unfused"] or "skipped" in by["timm-bf16-unfused"]  # timm is not in CI
    default = by["default"]
    assert "error" not in default, default
    kernels = {row["kernel"].split(":", 1)[0] for row in default["rows"]}
    assert kernels & {"matmul", "inner_product"} and default["onednn_ms"] > 0  # the step's GEMMs went through oneDNN
    assert default["onednn_isa"] and isinstance(default["amx"], bool)
    assert record["info"]["interop"] == 1 and (tmp_path / "k.json").exists()
    with pytest.raises(SystemExit, match="--steps 0"):
        step_kernels.main(["--steps", "0"])


def test_gemm_ways_times_a_steps_products_in_both_dtypes():
    from bench import gemm_ways

    shapes = gemm_ways.shapes("Ti/16", batch_size=2, quick=True)
    assert [s[0] for s in shapes][:4] == ["QKV forward", "MLP in forward", "MLP out forward",
                                          "MLP in weight gradient (x^T dy)"]
    full = {s[0]: s for s in gemm_ways.shapes("B/16")}
    assert full["QKV forward"] == ("QKV forward", 1, 16 * 197, 768, 2304, False)
    assert full["MLP in weight gradient (x^T dy)"][1:] == (1, 768, 16 * 197, 3072, True)
    assert full["attention q k^T"][1:] == (16 * 12, 197, 64, 197, False)
    rows = gemm_ways.measure("tf", shapes, repeats=1)
    assert len(rows) == 2 * len(shapes) and {r["dtype"] for r in rows} == {"bf16", "fp32"}
    eager = gemm_ways.measure("tf-eager", shapes[:1], repeats=1)  # one op at a time, as the `peak` case times it
    assert [r["dtype"] for r in eager] == ["bf16", "fp32"] and all(r["gflop_s"] > 0 for r in eager)
    assert all(r["gflop_s"] > 0 for r in rows)
    with pytest.raises(SystemExit, match="unknown case"):
        gemm_ways.main(["--ways", "tf-onednn,cuda"])


@pytest.mark.slow  # one training process (about 15 s)
def test_train_budget_stops_after_the_first_round(tmp_path):
    results = train.main(["--quick", "--cases", "tf-xla", "--rounds", "3", "--budget", "1",
                          "--json", str(tmp_path / "t.json")])
    import json

    info = json.loads((tmp_path / "t.json").read_text())["info"]
    assert info["rounds_run"] == 1
    assert len(results[0]["round_img_s"]) == 1 and results[0]["img_s"]["median"] > 0


def _amx_record(flags):
    """A minimal record of bench.amx: the GEMM ways, the peaks, a Ti/16 training stage and the inference stage."""
    when = {"start": {"date": "2026-12-03 06:30:00 UTC", "load": [0.5, 0.4, 0.3]},
            "end": {"date": "2026-12-03 06:35:00 UTC", "load": [1.5, 0.9, 0.4]}}
    train_rows = [{"case": c, "precision": p, "jit": "scoped" if "scoped" in c else "fusible",
                   "img_s": {"median": v, "spread": 0.05}, "round_img_s": [v - 1, v + 1]}
                  for c, p, v in (("default", "mixed_bfloat16", 60.0), ("tf-bf16-scoped", "mixed_bfloat16", 55.0),
                                  ("torch-bf16", "mixed_bfloat16", 30.0),
                                  ("timm", "float32", 20.0), ("timm-bf16", "bf16 autocast", 40.0),
                                  ("timm-bf16-unfused", "bf16 autocast, explicit attention", 50.0))]
    train_rows.append({"case": "notebook", "error": "exit 1: boom"})
    infer_rows = [{"case": c, "latency_ms": {"median": ms}, "throughput": {"median": 100.0}, "top1_agree": 1.0,
                   "max_abs_diff": 1e-5, "lat_x_onnx": ms / 10.0, "lat_x_timm-onnx": ms / 12.0}
                  for c, ms in (("onnx", 10.0), ("onnx-static", 5.0), ("onnx-opt-static", 4.5), ("timm-onnx", 12.0),
                                ("tflite", 16.0),
                                ("tflite-dynamic", 8.0), ("tflite-int8", 40.0))]
    return {"command": "bash bench/amx.sh", "quick": False, "budget_s": 840, "wall_s": 800, "commit": "abc1234",
            "machine": {"cpu": "Intel(R) Xeon(R) Platinum 8480+", "cpu_flags": flags, "cores": 2,
                        "load": [0.5, 0.4, 0.3], "date_start": "2026-12-03 06:30 UTC"},
            "versions": {"tensorflow": "2.21.0", "torch": None},
            "stages": {
                "gemm ways": {**when, "command": "python -m bench.gemm_ways --variant B/16",
                              "info": {"variant": "B/16", "batch_size": 16},
                              "results": [{"case": "tf-onednn", "version": "tensorflow 2.21.0", "env": {},
                                           "onednn_isa": "Intel AMX",
                                           "kernels": {"bf16": ["matmul:brg_matmul:avx512_core_amx"], "f32": ["gemm_api"]},
                                           "kernel_ms": {"bf16": {"matmul:brg_matmul:avx512_core_amx": 9.0,
                                                                  "reorder:jit:uni": 1.0}},
                                           "results": [{"shape": "QKV forward", "dims": [1, 3152, 768, 2304],
                                                        "dtype": d, "gflop_s": g} for d, g in (("bf16", 900.0),
                                                                                              ("fp32", 200.0))]},
                                          {"case": "jax-onednn", "version": "jax 0.10.2",
                                           "env": {"XLA_FLAGS": "--xla_cpu_use_onednn=true"}, "kernels": {},
                                           "results": [{"shape": "QKV forward", "dims": [1, 3152, 768, 2304],
                                                        "dtype": d, "gflop_s": g} for d, g in (("bf16", 1200.0),
                                                                                              ("fp32", 150.0))]},
                                          {"case": "torch", "skipped": "torch not installed"}]},
                "peak": {**when, "command": "python -m bench.train --cases peak",
                         "results": [{"case": "peak", "tf_bf16": 2000.0, "tf_fp32": 500.0, "peak_fp32": 500.0,
                                      "peak_bf16": 2000.0}]},
                "train Ti/16": {**when, "command": "python -m bench.train --variant Ti/16", "results": train_rows,
                                "info": {"image_size": 224, "batch_size": 16, "num_layers": 12, "rounds_run": 2,
                                         "gflop_per_image_train": 10.0}},
                "inference": {**when, "command": "python -m bench.infer", "ort_command": "python -m bench.ort_interleaved",
                              "results": infer_rows,
                              "info": {"variant": "Ti/16", "image_size": 224, "batch_size": 32, "eval_images": 32},
                              "interleaved": {"info": {"threads": "default"}, "files": {
                                  "keras-static.onnx": {"median_ms": 4.0, "x_keras_onnx": 0.5, "x_timm_onnx": 0.4},
                                  "keras-dynamic.tflite": {"median_ms": 3.0, "x_keras_onnx": 0.3, "x_timm_onnx": 0.25}}}},
            }}


def test_amx_markdown_names_the_cpu_kind_and_the_same_run_ratios():
    from bench.amx_table import markdown

    md = markdown(_amx_record(["avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"]))
    assert md.startswith("## The AMX table: Intel(R) Xeon(R) Platinum 8480+, AMX (amx_bf16, amx_int8)")
    assert "| QKV forward (1 x 3152 x 768 x 2304) | 900 | **1200** |" in md  # bf16: the fastest way in bold
    assert "| QKV forward (1 x 3152 x 768 x 2304) | **200** | 150 |" in md
    assert ("| tf-onednn | tensorflow 2.21.0 | `matmul:brg_matmul:avx512_core_amx` 90%, `reorder:jit:uni` 10% | "
            "`gemm_api` | **yes** |") in md  # bf16 with its time shares; fp32's record has only the names
    assert ("| jax-onednn | jax 0.10.2; XLA_FLAGS=--xla_cpu_use_onednn=true | not through oneDNN | not through "
            "oneDNN | no |") in md
    assert "gemm ways, torch: skipped: torch not installed" in md
    assert "| TensorFlow bf16 | 2000 |" in md
    # auto's rates from this run: 30 ms / (3 (1/500 - 1/2000) s/GFLOP) = 6.7 GFLOP; now (360, 2000): 4.4
    assert ('`CPU_GEMM_GFLOPS["amx_bf16"] = (500, 2000)` from these TensorFlow peaks puts bf16\'s break-even at 6.7 '
            "forward GFLOP per step; the entry now, (331, 1148), puts it at 4.7") in md
    # default: 60 img/s = 3.00x timm fp32, 1.20x the faster timm bf16 (explicit attention, 50), 600 GFLOP/s = 30% of
    # the bf16 peak, per round 59 / 61
    assert "| mixed_bfloat16, fusible | **60.00** | 5% | 3.00 | 1.20 | 600 | 30% bf16 | 59.00 / 61.00 |" in md
    assert ("| `vitcli train --jit scoped` | mixed_bfloat16, scoped (XLA around the blocks' element-wise work) | "
            "**55.00** | 5% | 2.75 | 1.10 |") in md
    assert ("| `KERAS_BACKEND=torch`, `mixed_bfloat16` (eager) | mixed_bfloat16 | **30.00** | 5% | 1.50 | 0.60 | 300 | "
            "15% bf16 |") in md  # Keras on torch: the precision alone (eager, no compilation choice)
    assert "| timm, `torch.autocast(\"cpu\", torch.bfloat16)` | bf16 autocast | **40.00** | 5% | 2.00 | - |" in md
    assert "2 alternating round(s)" in md and "train Ti/16, notebook: exit 1: boom" in md
    static = next(ln for ln in md.splitlines() if ln.startswith("| keras-vit ONNX static int8"))
    assert "| 5.00 | 0.50 | 0.42 | 4.00 | 0.50 | 0.40 |" in static and "100.0%" in static
    fused = next(ln for ln in md.splitlines() if ln.startswith("| keras-vit ONNX static int8, fused attention"))
    assert "| 4.50 | 0.45 | 0.38 | - | - | - |" in fused
    dynamic = next(ln for ln in md.splitlines() if ln.startswith("| keras-vit TFLite dynamic-range int8 (LiteRT)"))
    assert "| 8.00 | 0.80 | 0.67 | 3.00 | 0.30 | 0.25 |" in dynamic  # LiteRT's files in the interleaved loop too
    full = next(ln for ln in md.splitlines() if ln.startswith("| keras-vit TFLite full int8"))
    assert "| 40.00 | 4.00 | 3.33 | - | - | - |" in full  # no interleaved figure recorded for it
    assert "(Against the TFLite fp32 file in LiteRT: dynamic-range int8 0.50x, full int8 2.50x.)" in md
    assert "no AMX" not in md

    md = markdown(_amx_record(["avx512_bf16"]))
    assert "**no AMX** on this CPU" in md.splitlines()[0] and "none of them measures AMX" in md
    assert '`CPU_GEMM_GFLOPS["avx512_bf16"] = (500, 2000)`' in md


def test_amx_markdown_says_what_the_training_tables_mean_for_autos_modes():
    """Scoped against fusible at every size: a change only at 1.05x at each."""
    from bench.amx_table import markdown

    record = _amx_record(["avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"])
    rows = record["stages"]["train Ti/16"]["results"]
    md = markdown(record)  # scoped 55 against fusible 60
    assert "bf16: `scoped` against the default's `fusible` Ti/16 0.92x: not 1.05x or more at every size" in md
    rows[1]["img_s"]["median"] = 66.0  # scoped 1.10x at Ti/16
    record["stages"]["train B/16"] = {**record["stages"]["train Ti/16"], "results": [
        {**r, "img_s": {"median": r["img_s"]["median"] / 10, "spread": 0.1}} for r in rows
        if r["case"] in ("default", "tf-bf16-scoped")]}
    record["stages"]["train B/16"]["results"][1]["img_s"]["median"] = 6.1  # 1.02x at B/16: not every size
    md = markdown(record)
    assert "`fusible` Ti/16 1.10x, B/16 1.02x: not 1.05x or more at every size, so `fusible` stays." in md
    record["stages"]["train B/16"]["results"][1]["img_s"]["median"] = 6.6
    assert "**scoped is faster at every size measured**" in markdown(record)
    rows[0]["jit"] = "xla"  # a Ti/16 default that is not a bf16 step (a CPU without bf16): B/16's pair alone
    assert "against the default's `fusible` B/16 1.10x: **scoped is faster" in markdown(record)
    # where `auto` runs scoped (AMX since 2026-12-05) the table times fusible beside it, as tf-bf16
    for stage in ("train Ti/16", "train B/16"):
        for r in record["stages"][stage]["results"]:
            if r["case"] == "default":
                r["jit"] = "scoped"
            elif r["case"] == "tf-bf16-scoped":
                r.update(case="tf-bf16", jit="fusible")
    md = markdown(record)
    assert "bf16: `fusible` against the default's `scoped` Ti/16 1.10x, B/16 1.10x: **fusible is faster at every " \
           "size measured**" in md
    rows[1]["img_s"]["median"] = 50.0
    assert "`fusible` against the default's `scoped` Ti/16 0.83x, B/16 1.10x: not 1.05x or more at every size, so " \
           "`scoped` stays." in markdown(record)
    assert "| `vitcli train --jit fusible` | mixed_bfloat16, fusible |" in md


def test_amx_times_both_bf16_modes_once_a_round():
    """bench/amx.sh's training cases: the default and the other bf16 mode, not the default's own twice."""
    from bench.amx_table import train_cases

    assert "tf-bf16-scoped" in train_cases("fusible") and "tf-bf16" not in train_cases("fusible")
    assert "tf-bf16" in train_cases("scoped") and "tf-bf16-scoped" not in train_cases("scoped")
    assert {"tf-bf16", "tf-bf16-scoped"} <= set(train_cases("xla"))


def test_amx_markdown_gives_the_profile_by_op_kind():
    from bench.amx_table import markdown

    record = _amx_record(["avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"])
    when = {k: record["stages"]["peak"][k] for k in ("start", "end")}
    record["stages"]["profile Ti/16"] = {
        **when, "command": "python -m bench.profile_train --variant Ti/16", "step_ms": 500.0,
        "info": {"variant": "Ti/16", "image_size": 224, "batch_size": 16, "steps": 3},
        "kinds_ms": {"weight GEMMs (oneDNN MatMul, forward and backward)": 400.0, "XLA-fused element-wise": 150.0},
        "fusion_parts_ms": {"MlpBlock_3/mul + MlpBlock_3/add": 13.0},
        "other_ops_ms": {"_XlaCompile": 11.2, "_MklSoftmax": 8.4}}
    md = markdown(record)
    assert "**Where ViT-Ti/16's default step goes** (224 px, batch 16, mixed_bfloat16 + fusible, 3 profiled steps" in md
    assert "500 ms a step under the profiler (32.00 img/s)" in md
    assert "| weight GEMMs (oneDNN MatMul, forward and backward) | 400.0 | 0.80 |" in md
    assert "| XLA-fused element-wise | 150.0 | 0.30 |" in md and "MlpBlock_3/mul + MlpBlock_3/add 13.0." in md
    assert "Other TF ops by type (ms per step): _XlaCompile 11.2; _MklSoftmax 8.4." in md
    record["stages"]["profile Ti/16"] = {**when, "error": "exit 1: boom"}
    assert "profile Ti/16: exit 1: boom" in markdown(record)


def test_amx_markdown_names_the_step_kernels():
    from bench.amx_table import markdown

    record = _amx_record(["avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"])
    when = {k: record["stages"]["peak"][k] for k in ("start", "end")}
    row = {"kernel": "matmul:brg_matmul:avx512_core_amx", "problem": "3152x192:192x768", "calls": 11, "ms": 12.5}
    record["stages"]["step kernels Ti/16"] = {
        **when, "command": "python -m bench.step_kernels --variant Ti/16",
        "info": {"variant": "Ti/16", "steps": 3, "interop": 1},
        "results": [{"case": "default", "amx": True, "onednn_ms": 120.0, "kinds_ms": {"matmul": 100.0, "reorder": 20.0},
                     "rows": [row]},
                    {"case": "timm-bf16-unfused", "skipped": "timm not installed"}]}
    md = markdown(record)
    assert "**The kernels of ViT-Ti/16's training step** (`ONEDNN_VERBOSE=1` over 3 steps, 1 TensorFlow inter-op" in md
    assert "| case | AMX kernels | oneDNN ms | matmul | reorder |" in md and "| default | yes | 120.0 | 100.0 | 20.0 |" in md
    assert "12.5 ms, 11x `matmul:brg_matmul:avx512_core_amx` 3152x192:192x768." in md
    assert "step kernels Ti/16, timm-bf16-unfused: skipped: timm not installed" in md


def test_amx_share_of_peak_is_of_the_runs_fastest_square():
    """A GEMM ways square faster than the `peak` case raises the peak the training shares are of."""
    from bench.amx_table import markdown

    record = _amx_record(["avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"])
    ways = record["stages"]["gemm ways"]["results"]
    ways[1]["results"].append({"shape": "square 2048", "dims": [1, 2048, 2048, 2048], "dtype": "bf16", "gflop_s": 2400.0})
    ways[0]["results"].append({"shape": "square 2048", "dims": [1, 2048, 2048, 2048], "dtype": "fp32", "gflop_s": 400.0})
    md = markdown(record)
    assert "| bf16, the GEMM ways stage's 2048^3 square (jax-onednn) | 2400 |" in md
    assert "| fp32, the GEMM ways stage's 2048^3 square (tf-onednn) | 400 |" in md
    # default: 600 GFLOP/s of max(2000, 2400); timm fp32 (200 GFLOP/s) of max(500, 400)
    assert "| **60.00** | 5% | 3.00 | 1.20 | 600 | 25% bf16 |" in md
    assert "| **20.00** | 5% | - | 0.40 | 200 | 40% fp32 |" in md
    assert "(500, 2000)` from these TensorFlow peaks" in md  # auto's rates stay TensorFlow's own


def test_cpu_kind_names_the_core_behind_a_bare_model_name():
    """"AMD EPYC" was a Zen 5 one day and a Zen 4 at half its bf16 GEMM rate another: the figures carry the core."""
    from bench.common import cpu_kind, machine

    assert cpu_kind("AuthenticAMD", 25, 17) == "Zen 4 (family 25, model 17)"
    assert cpu_kind("AuthenticAMD", 26, 2) == "Zen 5 (family 26, model 2)"
    assert cpu_kind("GenuineIntel", 6, 143) == "Sapphire Rapids (family 6, model 143)"
    assert cpu_kind("GenuineIntel", 6, 42) == "family 6, model 42"
    assert cpu_kind("", None, None) == "unknown"
    assert isinstance(machine()["cpu_kind"], str)
    from bench.amx_table import markdown

    record = _amx_record(["avx512_bf16"])
    record["machine"].update(cpu="AMD EPYC", cpu_kind="Zen 4 (family 25, model 17)")
    md = markdown(record)
    assert md.startswith("## The AMX table: AMD EPYC (Zen 4 (family 25, model 17)), **no AMX**")
    assert "Machine: AMD EPYC (Zen 4 (family 25, model 17)), 2 cores" in md


def test_amx_table_renders_a_saved_record_again(tmp_path, capsys):
    import json

    from bench import amx_table

    path = tmp_path / "amx.json"
    path.write_text(json.dumps(_amx_record(["avx512_bf16"])))
    md = amx_table.main([str(path)])
    assert md == amx_table.markdown(_amx_record(["avx512_bf16"])) and capsys.readouterr().out == md
    with pytest.raises(SystemExit, match="usage"):
        amx_table.main([])


_INTERLEAVED = """
import sys
import keras_vit.layers.embedding as emb
calls = []
gemm_form = emb.PatchEmbedding._patches_times_kernel
emb.PatchEmbedding._patches_times_kernel = lambda self, images: calls.append(1) or gemm_form(self, images)
from bench import train_ab
sys.argv = ["train_ab", "--without", "patch-matmul", "--interleave", "3", "--image-size", "32", "--batch-size", "2",
            "--jit", "scoped", "--option", "num_layers=2"]
train_ab.main()
print("GEMM_TRACES", len(calls))
"""


@pytest.mark.slow  # two small (2-block) models trained in a fresh process
def test_train_ab_interleaves_both_variants_in_one_process():
    """`python -m bench.train_ab --interleave 3`: the as-built model's step is traced (with the patch GEMM) before
    the change is undone for the other model, then single steps alternate; the median ratio it prints lies inside
    the bootstrap interval it prints."""
    import os
    import re
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _INTERLEAVED], cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    traces = int(next(ln for ln in proc.stdout.splitlines() if ln.startswith("GEMM_TRACES")).split()[1])
    assert traces >= 1  # the as-built model traced the GEMM form; the undone one cannot reach it
    line = next(ln for ln in proc.stdout.splitlines() if "interleaved pairs of steps" in ln)
    assert line.startswith("Ti/16 (scoped, num_layers=2), 3 interleaved pairs of steps: as built"), line
    median, lo, hi = map(float, re.search(r": ([0-9.]+)x \(90% interval ([0-9.]+)-([0-9.]+);", line).groups())
    assert lo <= median <= hi, line


def test_train_ab_undoes_its_changes_and_reads_model_options():
    """bench.train_ab: `--option NAME=VALUE` typed as the ViT builder takes it, one clear error otherwise;
    `--without activation-gradient` puts quick_gelu / SwiGLU back op by op in bf16 training, and
    `--without relative-gather` the take_along_axis pick of the relative-offset logits, `--without
    qk-norm-scope` qk_norm's LayerNorms op by op, `--without patch-matmul` the patch embedding's Conv2D."""
    import argparse

    import numpy as np
    import tensorflow as tf

    import keras_vit.layers.block as block
    from bench import train_ab

    parser = argparse.ArgumentParser()
    assert train_ab._options(parser, ["mlp=swiglu", "qk_norm=true", "num_registers=4", "layer_scale_init=1e-5"]) == {
        "mlp": "swiglu", "qk_norm": True, "num_registers": 4, "layer_scale_init": 1e-5}
    with pytest.raises(SystemExit):
        train_ab._options(parser, ["swiglu"])
    saved = block._quick_gelu_with_input_gradient, block._swiglu_with_input_gradient
    try:
        train_ab._undo("activation-gradient")
        h = tf.cast(tf.constant(np.linspace(-3, 3, 24).reshape(3, 8), tf.float32), tf.bfloat16)
        ops = block.ops
        # op by op in bf16, bit for bit (the written-out forms compute in float32 and round once)
        np.testing.assert_array_equal(block.swiglu(h, 4, training=True), ops.silu(h[:, :4]) * h[:, 4:])
        np.testing.assert_array_equal(block.activate(h, "quick_gelu", training=True),
                                      h * ops.sigmoid(h * ops.cast(1.702, h.dtype)))
    finally:
        block._quick_gelu_with_input_gradient, block._swiglu_with_input_gradient = saved
    # `--without relative-gather`: the old take_along_axis pick, the same logits as built
    from keras_vit.layers.attention import MultiHeadSelfAttention

    layer = MultiHeadSelfAttention(num_heads=2, relative_grid=(2, 3), num_prefix_tokens=1)
    x = tf.constant(np.random.default_rng(0).normal(size=(3, 7, 8)), tf.float32)
    layer(x)
    layer.relative_embedding.assign(np.random.default_rng(1).normal(size=layer.relative_embedding.shape))
    q = layer._qkv(x, 1.0)[0]
    built = layer._relative_bias(q)
    saved = MultiHeadSelfAttention._relative_bias
    try:
        train_ab._undo("relative-gather")
        np.testing.assert_array_equal(layer._relative_bias(q), built)
        np.testing.assert_array_equal(layer._relative_bias(q[:, :, :1]), built[:, :, :1])  # class-token rows
    finally:
        MultiHeadSelfAttention._relative_bias = saved
    # `--without qk-norm-scope`: qk_norm's LayerNorms op by op, the same attention outside the scoped step
    import keras_vit.layers.attention as attention

    layer = MultiHeadSelfAttention(num_heads=2, qk_norm=True)
    built = layer(x, training=True)
    saved = attention.layer_norm
    try:
        train_ab._undo("qk-norm-scope")
        np.testing.assert_allclose(layer(x, training=True), built, rtol=1e-6, atol=1e-6)
    finally:
        attention.layer_norm = saved
    # `--without patch-matmul`: the patch embedding's Conv2D in bf16 training too
    from keras_vit.layers.embedding import PatchEmbedding

    embed = PatchEmbedding(4, (2, 2), dtype="mixed_bfloat16")
    images = tf.constant(np.random.default_rng(2).normal(size=(1, 4, 6, 3)), tf.float32)
    conv = embed(images, training=False)
    saved = PatchEmbedding._patches_times_kernel
    try:
        train_ab._undo("patch-matmul")
        np.testing.assert_array_equal(embed(images, training=True), conv)
    finally:
        PatchEmbedding._patches_times_kernel = saved


def test_train_ab_undoes_the_cpu_scoped_forms(monkeypatch):
    """`--without softmax-compute-dtype` / `mlp-bias-in-activation` / `bias-gradient-gemm` put back the float32
    softmax, Dense_0's bias add and TensorFlow's bias gradients in the AMX scoped step (forced here on any CPU)."""
    import keras
    import numpy as np
    import tensorflow as tf

    import keras_vit.layers.attention as attention
    import keras_vit.layers.block as block
    import keras_vit.layers.fusion as fusion
    from bench import train_ab

    monkeypatch.setenv("TF_XLA_FLAGS", "")
    monkeypatch.setenv(fusion.BIAS_APART_ENV, "1")
    for module, name in ((attention, "cpu_scoped"), (block, "cpu_scoped"), (block, "bias_gradient"),
                         (fusion, "add_bias")):
        monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
    layer = block.TransformerBlock(num_heads=2, mlp_dim=16, dtype=keras.mixed_precision.Policy("mixed_bfloat16"))
    x = tf.constant(np.random.default_rng(0).normal(size=(2, 5, 8)), tf.float32)
    layer(x)

    def step_ops():
        @tf.function
        def step(t):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.cast(layer(t, training=True), tf.float32))
            return tape.gradient(loss, layer.trainable_variables)

        graph = step.get_concrete_function(x).graph
        return [op.get_attr("T").name for op in graph.get_operations() if op.type == "Softmax"], None, step(x)

    activate, biased = block.activate, []
    monkeypatch.setattr(block, "activate", lambda *a, **k: biased.append(k.get("bias") is not None) or activate(*a, **k))
    softmax, _, built = step_ops()
    assert softmax == ["bfloat16"] and biased == [True]
    train_ab._undo("softmax-compute-dtype")
    assert step_ops()[0] == ["float32"]
    train_ab._undo("mlp-bias-in-activation")
    biased.clear()
    step_ops()
    assert biased == [False]
    train_ab._undo("bias-gradient-gemm")
    flat = [tf.concat([tf.reshape(tf.cast(g, tf.float32), [-1]) for g in grads], 0) for grads in (step_ops()[2], built)]
    assert float(tf.norm(flat[0] - flat[1])) <= 3e-2 * float(tf.norm(flat[1]))  # the same within bf16 rounding


def test_train_ab_undoes_several_changes_at_once(monkeypatch, capsys):
    """`--without A,B` undoes each (here the fused heads and the bf16 softmax); an unknown name is one clear line."""
    import sys

    import keras_vit.layers.attention as attention
    from bench import train_ab

    monkeypatch.setattr(attention, "FUSED_HEADS", True)
    monkeypatch.setattr(attention, "cpu_scoped", attention.cpu_scoped)  # restored after the test
    train_ab._undo("fused-heads,softmax-compute-dtype")
    assert attention.FUSED_HEADS is False and attention.cpu_scoped(None, True) is False
    monkeypatch.setattr(sys, "argv", ["train_ab", "--without", "fused-heads,no-such-change"])
    with pytest.raises(SystemExit):
        train_ab.main()
    assert "unknown change 'no-such-change'" in capsys.readouterr().err
