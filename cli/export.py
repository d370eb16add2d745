"""`vitcli export`: a trained keras-vit model -> ONNX, TFLite or SavedModel, verified against Keras."""
from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Iterator, Optional, Tuple

import click

from keras_vit.cli.common import UserError, outcome_decided, sigterm_cleans_up, user_errors
from keras_vit.weights.resize import METHODS

DEFAULT_MODEL = os.path.join("runs", "latest", "model.keras")


def _parse_thresholds(items: Tuple[str, ...]) -> dict:
    """{metric: limit} from NAME=NUMBER items; UserError for bad syntax, names or values."""
    from keras_vit.export.verify import check_thresholds

    limits = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            limits[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise UserError(f"--threshold {item!r} must look like NAME=NUMBER, e.g. top1_agreement=0.98")
    return check_thresholds(limits)


def _check_calibration(quantize: Optional[str]) -> None:
    """UserError for calibration options on the command line of an export that calibrates nothing."""
    ctx = click.get_current_context()
    given = [p.opts[0] for p in ctx.command.params if p.name in ("num_calibration", "calibration_dataset")
             and ctx.get_parameter_source(p.name) == click.core.ParameterSource.COMMANDLINE]
    if given and quantize != "int8":
        verb = "apply" if len(given) > 1 else "applies"
        raise UserError(f"{' and '.join(given)} {verb} to --quantize int8 only (got --quantize {quantize or 'none'})")


def _tensorflow_backend() -> None:
    """Export traces TensorFlow graphs (tf2onnx, TFLiteConverter, SavedModel): this command runs on the
    TensorFlow backend whatever KERAS_BACKEND says (a .keras file of any backend loads there), when
    Keras is not imported yet (a fresh vitcli process)."""
    if "keras" in sys.modules:
        return
    asked = os.environ.get("KERAS_BACKEND", "")
    if asked not in ("", "tensorflow"):
        click.echo(f"export runs on the TensorFlow backend (KERAS_BACKEND={asked} set aside for this command)", err=True)
    os.environ["KERAS_BACKEND"] = "tensorflow"  # over ~/.keras/keras.json's backend too


def _check_options(fmt: str, quantize: Optional[str], optimize: bool, opset: int, layout: str,
                   dynamic_size: bool, input_dtype: str, interpolation: Optional[str]) -> None:
    """UserError for options that do not go together (before anything heavy is imported)."""
    if fmt != "onnx" and (optimize or opset != 17 or layout != "nhwc"):
        raise UserError("--optimize, --opset and --layout apply to --format onnx only")
    if fmt == "tflite" and dynamic_size:
        raise UserError("--dynamic-size applies to --format onnx and saved_model; TFLite files take one image size")
    if fmt == "saved_model" and quantize:
        raise UserError("--quantize applies to --format onnx and tflite; a SavedModel keeps float32 weights")
    if fmt != "saved_model" and input_dtype != "float32":
        raise UserError("--input-dtype applies to --format saved_model only")
    if interpolation and not dynamic_size:
        raise UserError("--interpolation applies with --dynamic-size only")
    if fmt == "onnx" and opset != 17:  # before check_parent makes --output's folder
        from keras_vit.export.onnx import MIN_OPSET, max_opset

        if not MIN_OPSET <= opset <= max_opset():
            raise UserError(f"--opset must be from {MIN_OPSET} to {max_opset()} (tf2onnx's newest), got {opset}")


def _echo_int8_speed(path: str) -> None:
    """The full-int8 vs float32 timing the TFLite export recorded in the file's metadata."""
    from keras_vit.export.tflite import read_metadata

    speed = json.loads((read_metadata(path) or {}).get("int8_vs_fp32", "{}"))
    if speed:
        click.echo(speed.get("note") or f"full-int8 runs {speed['int8_ms']:.3g} ms against "
                   f"{speed['fp32_ms']:.3g} ms for float32 at batch 1 ({speed['ratio']:.2f}x)")


def _remove_stale_report(path: str) -> None:
    """Remove the report (JSON, PNG) of an earlier export to `path`: it describes another file."""
    from keras_vit.export.verify import plot_path, report_path

    for stale in (report_path(path), plot_path(path)):
        if os.path.isfile(stale):
            os.remove(stale)
            click.echo(f"Removed {stale} (it checked the file this export replaced; not verified: --no-verify)")


def default_output(model_path: str, fmt: str, quantize: Optional[str], optimize: bool,
                   dynamic_size: bool = False, layout: str = "nhwc") -> str:
    """Beside the model: model[.QUANTIZE][.opt][.dynamic][.nchw].onnx / .tflite, model.saved_model/."""
    stem = os.path.splitext(model_path)[0]
    tags = ([quantize] if quantize else []) + (["opt"] if optimize else []) + (
        ["dynamic"] if dynamic_size else []) + (["nchw"] if layout == "nchw" else [])
    return stem + "".join("." + t for t in tags) + "." + fmt


def _through_links(model_path: str) -> str:
    """`model_path` with its folder's links resolved (runs/latest -> runs/RUN), read once: a training started
    meanwhile moves runs/latest, and the export of the old model went into the new run's folder."""
    folder, name = os.path.split(model_path)
    real = os.path.realpath(folder or ".")
    if real == os.path.abspath(folder or "."):
        return model_path
    return os.path.join(real if os.path.isabs(folder) else os.path.relpath(real), name)


@click.command("export")
@click.option("--model", "model_path", default=DEFAULT_MODEL, show_default=True,
              help="The .keras file of a keras-vit model, or a training run's folder (its model.keras).")
@click.option("--format", "fmt", type=click.Choice(["onnx", "tflite", "saved_model"]), default="onnx",
              show_default=True, help="saved_model: a TF-Serving-ready folder (signature serving_default).")
@click.option("--quantize", type=click.Choice(["fp16", "int8", "dynamic"]), default=None,
              help="TFLite: fp16, dynamic (int8 weights) or int8 (full integer, calibrated). ONNX: fp16, dynamic "
                   "(int8 weights) or int8 (static, calibrated; sensitive ops kept float).")
@click.option("--calibration", "num_calibration", type=click.IntRange(min=1), default=300, show_default=True,
              help="int8: number of calibration images (from --calibration-dataset, its train split).")
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset: 17 up to the newest tf2onnx writes (tf2onnx 1.17: 18).")
@click.option("--optimize", is_flag=True, help="ONNX, for onnxruntime only: fused Attention op per block, LayerNorm and GELU fusions.")
@click.option("--output", "output", default=None,
              help="Output file (default: beside the model, e.g. runs/latest/model.onnx).")
@click.option("--verify-dataset", default=None,
              help="Images for the accuracy check: digits, photos, default, a registry dataset, or folder:PATH "
                   "(default: the run's dataset, else offline digits + photos).")
@click.option("--calibration-dataset", default=None,
              help="int8 calibration images (same sources as --verify-dataset; default: the run's dataset).")
@click.option("--num-images", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images used by the accuracy check.")
@click.option("--threshold", "thresholds", multiple=True, metavar="NAME=VALUE",
              help="Override a check, e.g. top1_agreement=0.98 or max_abs_diff=1e-3 (repeatable).")
@click.option("--no-verify", is_flag=True, help="Skip the accuracy check.")
@click.option("--dynamic-size", is_flag=True,
              help="ONNX / SavedModel: any image height and width (multiples of the patch size); position "
                   "embeddings interpolated in the graph. Verified at the training size and a non-square one.")
@click.option("--interpolation", type=click.Choice(list(METHODS)), default=None,
              help="With --dynamic-size: how position embeddings are resampled (default: the model's own, as "
                   "resize_model: linear, or a timm checkpoint's bicubic_antialias).")
@click.option("--layout", type=click.Choice(["nhwc", "nchw"]), default="nhwc", show_default=True,
              help="ONNX: the images input layout.")
@click.option("--input-dtype", type=click.Choice(["float32", "uint8"]), default="float32", show_default=True,
              help="SavedModel: the dtype serving_default takes (both have their own signature too).")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
              help="Where verify runs an ONNX file: onnxruntime's CUDA provider (needs keras-vit[gpu]) or CPU.")
@user_errors
@sigterm_cleans_up()
def export_cmd(model_path: str, fmt: str, quantize: Optional[str], opset: int, optimize: bool,
               output: Optional[str], verify_dataset: Optional[str], calibration_dataset: Optional[str],
               num_images: int, thresholds: Tuple[str, ...], no_verify: bool, dynamic_size: bool,
               interpolation: Optional[str], layout: str, input_dtype: str, device: str,
               num_calibration: int) -> None:
    """Export a trained model to ONNX or TFLite and check it predicts what the Keras model predicts.

    Writes the file under a temporary name beside --output, verifies it there, and renames it
    over --output only when every check passes, with a JSON report beside it. A file that fails
    is kept as NAME.failed.EXT with its own FAILED report, --output stays as it was, and the exit
    status is 1. --no-verify writes --output directly.
    """
    if no_verify:  # the options verification reads would be ignored without a word
        ctx = click.get_current_context()
        given = [flag for flag, value in (("--threshold", thresholds), ("--verify-dataset", verify_dataset)) if value]
        given += [p.opts[0] for p in ctx.command.params if p.name in ("num_images", "device")
                  and ctx.get_parameter_source(p.name) == click.core.ParameterSource.COMMANDLINE]
        if given:
            raise UserError(f"{given[0]} sets the verification that --no-verify skips; drop one of them")
    _tensorflow_backend()
    _check_options(fmt, quantize, optimize, opset, layout, dynamic_size, input_dtype, interpolation)
    _check_calibration(quantize)
    limits = _parse_thresholds(thresholds)
    if not os.path.exists(model_path):
        hint = " (train one first: vitcli train)" if model_path == DEFAULT_MODEL else ""
        raise UserError(f"model file {model_path!r} does not exist{hint}")
    from keras_vit.train.runs import model_path as run_model_path
    from keras_vit.train.runs import read_run

    model_path = _through_links(run_model_path(model_path))  # a run folder, as predict and evaluate take: its model.keras
    run = read_run(model_path)
    class_names, run_dataset = run.class_names, run.dataset
    calibration_from_run = quantize == "int8" and calibration_dataset is None
    if calibration_from_run:
        if run_dataset is None:
            raise UserError("int8 export needs calibration data: pass --calibration-dataset "
                            "(a dataset name such as digits, or folder:PATH)")
        calibration_dataset = run_dataset
    output = output or default_output(model_path, fmt, quantize, optimize, dynamic_size, layout)

    from keras_vit.export import export_verified, format_table, to_onnx, to_saved_model, to_tflite
    from keras_vit.export._common import resolve_model
    from keras_vit.export.images import check_source
    from keras_vit.export.runner import check_device

    if not no_verify:
        check_device(device, fmt)
    model, cfg = resolve_model(model_path)
    # Whatever can fail after the export is checked before it writes (or replaces) the file.
    if quantize == "int8":
        with _naming_the_run(calibration_from_run, model_path, "--calibration-dataset"):
            check_source(calibration_dataset, cfg.channels, split="train")
    if not no_verify:
        with _naming_the_run(verify_dataset is None and run_dataset is not None, model_path, "--verify-dataset"):
            check_source(verify_dataset or run_dataset, cfg.channels)
    if getattr(model, "class_names", None) or (class_names is not None and len(class_names) != cfg.num_classes):
        class_names = None  # the names the model carries win; a run file that does not match is left out
    if fmt == "onnx":
        writer, options = to_onnx, dict(opset=opset, optimize=optimize, quantize=quantize, class_names=class_names,
                                        dynamic_size=dynamic_size, layout=layout, interpolation=interpolation,
                                        calibration_images=calibration_dataset, num_calibration_images=num_calibration)
    elif fmt == "saved_model":
        writer, options = to_saved_model, dict(class_names=class_names, input_dtype=input_dtype,
                                               dynamic_size=dynamic_size, interpolation=interpolation)
    else:
        writer, options = to_tflite, dict(quantize=quantize, representative_images=calibration_dataset,
                                          class_names=class_names, num_calibration_images=num_calibration)
    if no_verify:  # written straight to --output, as the user asked for no check
        path = writer(model, output, **options)
        outcome_decided(0)
        _echo_written(path, fmt, quantize)
        _remove_stale_report(path)
        return
    if not (optimize or quantize):  # those need onnxruntime itself: their one line comes from the writer
        _echo_reference_evaluator(fmt)
    had_output = os.path.exists(output)
    report = export_verified(model, output, format=fmt, images=verify_dataset or run_dataset, num_images=num_images,
                             thresholds=limits, device=device, **options)
    outcome_decided(0 if report["passed"] else 1)  # renamed into place (or kept as NAME.failed.EXT): done
    path = report["file"]
    if report["passed"]:
        _echo_written(path, fmt, quantize)
    click.echo(format_table(report))
    click.echo(f"Report: {report['report_path']} (plot: {report['plot_path']})")
    if not report["passed"]:
        kept = f"{output} is unchanged" if had_output else f"nothing was written to {output}"
        raise click.ClickException(f"verification failed: {'; '.join(report['failures'])}; the file is kept as "
                                   f"{path} beside its report, and {kept}")


@contextlib.contextmanager
def _naming_the_run(from_run: bool, model_path: str, option: str) -> Iterator[None]:
    """Images the user did not name, the run's own dataset (its config.json), that cannot be read: the
    one line says where they came from and which option gives others."""
    from keras_vit.export import ExportError

    try:
        yield
    except ExportError as exc:
        if not from_run:
            raise
        raise ExportError(f"{exc} (the dataset of the run that trained {model_path}, from its config.json); "
                          f"pass {option} to use other images") from None


def _echo_written(path: str, fmt: str, quantize: Optional[str]) -> None:
    """'Wrote PATH (size)', and for a full-int8 TFLite file its speed against float32."""
    size = os.path.getsize(path) if os.path.isfile(path) else sum(
        os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
    click.echo(f"Wrote {path} ({size / 1e6:.1f} MB)")
    if fmt == "tflite" and quantize == "int8":
        _echo_int8_speed(path)


def _echo_reference_evaluator(fmt: str) -> None:
    """The one line saying that ONNX files are verified without onnxruntime, and which extra brings it."""
    from keras_vit.export.runner import ONNXRUNTIME_MISSING, have_onnxruntime

    if fmt == "onnx" and not have_onnxruntime():
        click.echo(ONNXRUNTIME_MISSING)
