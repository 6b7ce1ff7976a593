"""The export where models are served: its precision, TF Serving's layout and warmup file, the LiteRT and
ONNX conversions (tools/convert.py) and the tools that run them (tools/converted.py)."""

import importlib
import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import prediction_log_pb2

from pipeline import input_pipeline
from pipeline import manifest as manifest_lib
from pipeline import records
from tools import convert
from tools import converted
from tools import predict as predict_tool
from trainer import export as export_lib
from trainer import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(smoke_runs):
  """deep.py:smoke trained in mixed_bfloat16 on 1 replica, exported with the defaults."""
  return smoke_runs(1)


def _nodes(export_dir: str) -> list:
  """Every node of the SavedModel's graph and function library."""
  saved = saved_model_pb2.SavedModel()
  with open(os.path.join(export_dir, "saved_model.pb"), "rb") as f:
    saved.ParseFromString(f.read())
  graph = saved.meta_graphs[0].graph_def
  return list(graph.node) + [n for f in graph.library.function for n in f.node_def]


def _dtypes(export_dir: str) -> dict[str, set[str]]:
  """Every op of the SavedModel's graph and function library -> the dtypes in its attributes."""
  found = {}
  for node in _nodes(export_dir):
    for value in node.attr.values():
      for dtype in [value.type] + list(value.list.type):
        if dtype:
          found.setdefault(node.op, set()).add(tf.dtypes.as_dtype(dtype).name)
  return found


def test_a_bf16_run_exports_a_float32_graph(run):
  workdir, metrics, config = run
  assert config.mixed_precision == "mixed_bfloat16" and config.export_precision == "float32"
  dtypes = _dtypes(os.path.join(workdir, "export"))
  assert "Conv2D" in dtypes and not [op for op, types in dtypes.items() if "bfloat16" in types]
  assert not {"Erfc"} & set(dtypes)  # GELU as erf: an op LiteRT fuses and ONNX has
  assert metrics["validation"]["count"] == 200


def test_the_export_holds_no_backward_ops(run):
  """The export serves: layers.Conv2D's own gradients (float32 on a CPU) are for training. Saved with the
  export until 2026-12-06 (Conv2DBackpropFilter in its functions); left out by SaveOptions, every load
  warned of "unsaved custom gradients". The serving copy is built without them."""
  workdir, _, _ = run
  nodes = _nodes(os.path.join(workdir, "export"))
  ops = {n.op for n in nodes}
  assert "Conv2D" in ops and not [op for op in ops if re.search(r"Backprop|Grad(V\d+)?$", op)], sorted(ops)
  assert not [n.name for n in nodes if "_gradient_op_type" in n.attr]


def _data_images(data_dir: str) -> dict[bytes, str]:
  """Every record of every split of `data_dir`, as the bytes that could leak: its encoded image (raw pixels,
  PNG or JPEG) and its decoded pixels -> the record's id."""
  manifest = manifest_lib.load(data_dir)
  found = {}
  for split in manifest["splits"]:
    for batch in tf.data.TFRecordDataset(manifest_lib.split_files(data_dir, manifest, split)).batch(256):
      features = records.parse_batch(batch)
      pixels = records.decode_batch(features[records.ENCODED], features[records.FORMAT],
                                    shape=manifest_lib.image_shape(manifest))
      for image_id, encoded, image in zip(features[records.ID].numpy(), features[records.ENCODED].numpy(), pixels):
        found[encoded] = found[image.numpy().tobytes()] = image_id.decode()
  return found


def _run_as_tf_serving(version_dir: str, requests) -> list[dict[str, np.ndarray]]:
  """Each request through its signature as TF Serving runs its warmup: the SavedModel loaded into a session
  by the graph loader (variables restored by the saver's restore op), not by Python's object loader."""
  with tf.Graph().as_default() as graph, tf.compat.v1.Session(graph=graph) as session:
    meta_graph = tf.compat.v1.saved_model.loader.load(session, [tf.saved_model.SERVING], version_dir)
    outputs = []
    for request in requests:
      signature = meta_graph.signature_def[request.model_spec.signature_name]
      feeds = {signature.inputs[key].name: tf.make_ndarray(proto) for key, proto in request.inputs.items()}
      outputs.append(session.run({key: info.name for key, info in signature.outputs.items()}, feeds))
  return outputs


def test_tf_serving_layout_and_warmup_requests_for_every_signature(run):
  """The warmup file holds none of the data's images (it ships with the model: only synthetic ones), and
  TF Serving's loader runs each of its requests to the export's answers on those images."""
  workdir, _, config = run
  serving = os.path.join(workdir, "serving")
  assert sorted(os.listdir(serving)) == ["8"]  # the train step; nothing temporary left
  data_images = _data_images(config.data_dir)
  assert len(data_images) >= 1000  # every split's records (raw records: their pixels are their bytes)
  for folder in [os.path.join(workdir, "export")] + [os.path.join(serving, v) for v in os.listdir(serving)]:
    for directory, _, files in os.walk(folder):
      for name in files:
        with open(os.path.join(directory, name), "rb") as f:
          content = f.read()
        leaked = sorted({image_id for image, image_id in data_images.items() if image in content})
        assert not leaked, f"{os.path.join(directory, name)} holds the images of records {leaked[:5]}"
  version = os.path.join(serving, "8")
  logs = [prediction_log_pb2.PredictionLog.FromString(r.numpy())
          for r in tf.data.TFRecordDataset(os.path.join(version, export_lib.WARMUP_FILE))]
  requests = [log.predict_log.request for log in logs]
  sizes = [(r.model_spec.signature_name, len(tf.make_ndarray(p))) for r in requests for p in r.inputs.values()]
  assert sorted(sizes) == sorted((name, size) for name in ("serving_default", "serve_bytes", "serve_examples")
                                 for size in export_lib.WARMUP_BATCHES)
  examples = [tf.make_ndarray(r.inputs["examples"]) for r in requests if r.model_spec.signature_name == "serve_examples"]
  shipped = tf.train.Example.FromString(examples[-1][-1]).features.feature
  assert shipped["image/id"].bytes_list.value[0].startswith(b"warmup")  # not the data's ids and labels
  assert shipped["image/class/label"].int64_list.value[0] == 0
  # The expectation comes from elsewhere than the requests: export/'s own serving_default on the synthetic
  # images export.warmup_images makes.
  exported = export_lib.load(os.path.join(workdir, "export")).signatures["serving_default"]
  expected = exported(images=tf.constant(export_lib.warmup_images((32, 32, 3), max(export_lib.WARMUP_BATCHES))))
  for request, out in zip(requests, _run_as_tf_serving(version, requests)):
    size = out["classes"].shape[0]
    assert out["probabilities"].shape == (size, 10) and size in export_lib.WARMUP_BATCHES, request.model_spec
    np.testing.assert_allclose(out["probabilities"], expected["probabilities"][:size], atol=1e-5)
    np.testing.assert_array_equal(out["classes"], expected["classes"][:size])
  layer = keras.layers.TFSMLayer(os.path.join(workdir, "export"), call_endpoint="serving_default")  # Keras 3
  images8 = next(iter(input_pipeline.build_eval_dataset(config.data_dir, "test", batch_size=8)))["images"]
  np.testing.assert_array_equal(layer(images8)["probabilities"].numpy(), exported(images=images8)["probabilities"].numpy())


def test_versions_are_numbered_kept_once_written_and_the_oldest_removed(tmp_path):
  export_dir = tmp_path / "export"
  (export_dir / "variables").mkdir(parents=True)
  (export_dir / "assets.extra").mkdir()
  (export_dir / "variables" / "variables.index").write_bytes(b"index")
  versions = str(tmp_path / "serving")

  def publish(step: int, precision: str) -> str:
    (export_dir / "saved_model.pb").write_bytes(f"graph {step} {precision}".encode())
    (export_dir / export_lib.DESCRIPTION_FILE).write_text(json.dumps({"step": step, "export_precision": precision}))
    return os.path.basename(export_lib.publish_version(str(export_dir), versions, step, keep=2))

  assert [publish(step, "float32") for step in (10, 20, 30, 30)] == ["10", "20", "30", "30"]
  assert sorted(os.listdir(versions)) == ["20", "30"]
  assert (tmp_path / "serving" / "30" / "variables" / "variables.index").read_bytes() == b"index"
  # Another export of step 30: version 30 stays as it was (TF Serving would not reload it); TF Serving serves
  # the highest version, so the new export is published above every one, and so is a return to float32.
  assert [publish(30, "bfloat16"), publish(30, "bfloat16"), publish(30, "float32")] == ["31", "31", "32"]
  assert sorted(os.listdir(versions)) == ["31", "32"]
  assert (tmp_path / "serving" / "31" / "saved_model.pb").read_bytes() == b"graph 30 bfloat16"


def _description(export_dir: str) -> dict:
  with open(os.path.join(export_dir, export_lib.DESCRIPTION_FILE)) as f:
    return json.load(f)


def test_serving_follows_an_export_of_other_settings_at_the_same_step(tmp_path):
  """A finished run exported again with another export_precision (same step, same weights): TF Serving's
  highest version is the new export/, under a new number; the same export once more adds no version."""
  config = importlib.import_module("configs.mlp").get_config("smoke")
  keras.mixed_precision.set_dtype_policy("float32")
  model = models.build(config.model)
  path, versions = str(tmp_path / "export"), str(tmp_path / "serving")
  for precision in ("float32", "bfloat16", "bfloat16"):
    config.export_precision = precision
    export_lib.export(export_lib.serving_model(model, config, models.CIFAR10), path, mean=(0.5,) * 3, std=(1.0,) * 3,
                      class_names=[f"c{i}" for i in range(10)], versions=versions, version=8, keep_versions=3)
  assert sorted(os.listdir(versions)) == ["8", "9"]
  assert "bfloat16" in set().union(*_dtypes(os.path.join(versions, "9")).values())  # what export/ computes in
  assert "bfloat16" not in set().union(*_dtypes(os.path.join(versions, "8")).values())
  assert _description(os.path.join(versions, "9")) == _description(path)
  assert _description(path)["export_precision"] == "bfloat16" and _description(path)["step"] == 8
  assert _description(os.path.join(versions, "8"))["export_precision"] == "float32"


@pytest.mark.parametrize("name,overrides", [
    ("deep", {}), ("deeper", {}), ("default", {"model.sync_bn": True, "model.fast_kernels": False}),
    ("vgg_small", {}), ("mlp", {})], ids=["airbench", "airbench-residual", "resnet-sync_bn-keras_layers",
                                          "plain_cnn-dropout", "mlp"])
def test_the_serving_copy_computes_what_the_trained_model_does(name, overrides):
  """export.serving_model rebuilds the model and copies each weight by its path; in float32 both give the
  same logits (every builder; dropout, synchronized BatchNorm and Keras's own layers on the trained side)."""
  config = importlib.import_module(f"configs.{name}").get_config("smoke")
  for key, value in overrides.items():
    config[key.split(".")[0]][key.split(".")[1]] = value
  config.mixed_precision = "float32"
  keras.mixed_precision.set_dtype_policy("float32")
  model = models.build(config.model)
  seeds = {path: i for i, path in enumerate(sorted(w.path for w in model.weights))}  # each weight its own values:
  for weight in model.weights:  # a weight left uncopied, or copied to another of its shape, would show
    weight.assign(np.random.default_rng(seeds[weight.path]).normal(0.5, 0.1, weight.shape).astype("float32"))
  served = export_lib.serving_model(model, config, models.CIFAR10)
  assert served is not model
  x = tf.constant(np.random.default_rng(0).normal(size=(4, 32, 32, 3)), tf.float32)
  np.testing.assert_allclose(served(x, training=False).numpy(), model(x, training=False).numpy(), rtol=1e-4, atol=1e-4)


def test_the_stock_litert_converter_takes_the_export_of_a_bf16_run(run):
  """tf.lite.TFLiteConverter.from_saved_model, as a user calls it, on the export of a mixed_bfloat16 run:
  a model holding the weights that LiteRT runs to the SavedModel's classes (it once converted to a model
  without them, whose probabilities were NaN)."""
  from ai_edge_litert import interpreter as litert  # pylint: disable=g-import-not-at-top
  from tensorflow.lite.python import schema_py_generated as schema  # pylint: disable=g-import-not-at-top
  workdir, _, config = run
  export_dir = os.path.join(workdir, "export")
  assert config.mixed_precision == "mixed_bfloat16"
  content = tf.lite.TFLiteConverter.from_saved_model(export_dir, signature_keys=["serving_default"]).convert()
  model = schema.Model.GetRootAs(content, 0)
  codes = [model.OperatorCodes(i) for i in range(model.OperatorCodesLength())]
  ops = {max(code.BuiltinCode(), code.DeprecatedBuiltinCode()) for code in codes}
  assert not ops & {schema.BuiltinOperator.VAR_HANDLE, schema.BuiltinOperator.READ_VARIABLE}  # weights frozen
  runner = litert.Interpreter(model_content=content).get_signature_runner("serving_default")
  saved = export_lib.load(export_dir).signatures["serving_default"]
  agree = total = 0
  for batch in input_pipeline.build_eval_dataset(config.data_dir, "validation", batch_size=50):
    probabilities = runner(images=batch["images"].numpy())["probabilities"]
    assert not np.isnan(probabilities).any()
    agree += int(np.sum(probabilities.argmax(-1) == saved(images=batch["images"])["classes"].numpy()))
    total += len(probabilities)
  assert total == 200 and agree / total >= 0.999, (agree, total)


@pytest.mark.parametrize("to", ["litert", "onnx"])
def test_float32_conversions_give_the_savedmodels_classes(run, tmp_path, to):
  workdir, _, config = run
  export_dir = os.path.join(workdir, "export")
  output = convert.convert(export_dir, to, output=str(tmp_path / f"model{convert.SUFFIX[to]}"),
                           data_dir=config.data_dir)
  model = converted.load(output)
  saved = converted.SavedModel(export_dir)
  assert model.class_names == saved.class_names and model.image_shape == (32, 32, 3)
  counts = convert.agreement(saved, model, config.data_dir, "validation", 64)
  assert counts["images"] == 200 and counts["agree"] == 200
  images = next(iter(input_pipeline.build_eval_dataset(config.data_dir, "test", batch_size=8)))["images"].numpy()
  np.testing.assert_allclose(model.probabilities(images), saved.probabilities(images), atol=1e-5)


@pytest.mark.parametrize("to", ["litert", "onnx"])
def test_int8_conversions_are_calibrated_and_run(run, tmp_path, to):
  workdir, _, config = run
  export_dir = os.path.join(workdir, "export")
  output = convert.convert(export_dir, to, "int8", output=str(tmp_path / f"m{convert.SUFFIX[to]}"),
                           data_dir=config.data_dir, calibration_count=64)
  model = converted.load(output)
  images = next(iter(input_pipeline.build_eval_dataset(config.data_dir, "test", batch_size=32)))["images"].numpy()
  probabilities = model.probabilities(images)
  np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=2e-2)
  saved = converted.SavedModel(export_dir).probabilities(images)
  assert 0 < np.abs(probabilities - saved).max() < 0.2  # quantized: near the float model, not equal to it


def test_int8_without_data_and_output_a_directory_are_refused(run, tmp_path):
  workdir, _, _ = run
  export_dir = os.path.join(workdir, "export")
  with pytest.raises(converted.ModelError, match="--quantize=int8 calibrates on train images: give --data_dir"):
    convert.convert(export_dir, "litert", "int8")
  with pytest.raises(converted.ModelError, match=f"--output={tmp_path} is a directory"):
    convert.convert(export_dir, "litert", output=str(tmp_path))
  # A name the tools would not read back as that format (they go by the suffix): refused before converting.
  for to, name in (("litert", "model.litert"), ("onnx", "model.tflite")):
    with pytest.raises(converted.ModelError, match=re.escape(
        f"--output={tmp_path / name}: a --to={to} file must end in {convert.SUFFIX[to]}")):
      convert.convert(export_dir, to, output=str(tmp_path / name))
    assert not (tmp_path / name).exists()
  bad = tmp_path / "bad.tflite"
  bad.write_bytes(b"not a model")
  with pytest.raises(converted.ModelError, match="bad.tflite: not a LiteRT model"):
    converted.load(str(bad))
  with pytest.raises(converted.ModelError, match="missing.onnx: no such model file"):
    converted.load(str(tmp_path / "missing.onnx"))


def test_convert_refuses_a_conversion_that_lost_its_weights(tmp_path):
  """A SavedModel tracking its Keras model, as exports did before export.Serving tracked the model's
  tf.Variables, converts without an error to a LiteRT model whose weights are variables nothing initialises
  (NaN probabilities, or whatever their memory holds): tools.convert says so and writes nothing."""
  keras.mixed_precision.set_dtype_policy("float32")
  model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(10)])
  module = tf.Module()
  module.model, module.class_names = model, tf.Variable([f"c{i}" for i in range(10)])
  module.serve = tf.function(lambda images: {"probabilities": tf.nn.softmax(model(tf.cast(images, tf.float32)))},
                             input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.uint8, name="images")])
  tf.saved_model.save(module, str(tmp_path / "export"), signatures={"serving_default": module.serve})
  output = str(tmp_path / "export.tflite")
  with pytest.raises(converted.ModelError, match="export: its weights do not convert to LiteRT .* run its training"):
    convert.convert(str(tmp_path / "export"), "litert", output=output)
  assert not os.path.exists(output)


def _cli(*args):
  result = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
  return result.returncode, result.stdout, result.stderr


@pytest.mark.slow
def test_convert_and_predict_commands_on_a_tflite_file(run, tmp_path, program):
  """The issue's acceptance 4: tools.predict on a .tflite prints the SavedModel's class, in its own format."""
  workdir, _, config = run
  export_dir = os.path.join(workdir, "export")
  output = str(tmp_path / "model.tflite")
  code, out, err = _cli("tools.convert", f"--model={export_dir}", "--to=litert", f"--output={output}",
                        f"--data_dir={config.data_dir}")
  assert code == 0, err
  lines = out.strip().splitlines()
  assert lines[0].startswith(f"wrote {output}: LiteRT, quantize=none, ") and "MB" in lines[0]
  assert lines[1:] == ["split: validation  images: 200", lines[2], "same class as the SavedModel: 1.0000 (0 differ)",
                       "accuracy: " + lines[2].split(": ")[1]]
  images = next(iter(input_pipeline.build_eval_dataset(config.data_dir, "test", batch_size=3)))["images"]
  paths = []
  for i, image in enumerate(images):
    paths.append(str(tmp_path / f"{i}.png"))
    tf.io.write_file(paths[-1], tf.io.encode_png(image))
  code, out, err = _cli("tools.predict", f"--model={output}", *paths)
  assert code == 0, err
  expected = predict_tool.predict(export_dir, paths)
  assert [line.split("\t")[:2] for line in out.strip().splitlines()] == [[p, top[0][0]] for p, top in expected]
  # Their refusals, in this process (conftest's `program`).
  refused = program(convert, f"--model={export_dir}", "--to=onnx", "--quantize=int8")
  assert refused.returncode == 1 and refused.stderr.strip().splitlines()[-1] == (
      "convert: error: --quantize=int8 calibrates on train images: give --data_dir")
  refused = program(predict_tool, f"--model={tmp_path}/none.tflite", paths[0])
  assert refused.returncode == 1 and refused.stderr.strip().splitlines()[-1] == (
      f"predict: error: {tmp_path}/none.tflite: no such model file")


def test_serve_bytes_refuses_an_image_above_the_pixel_limit_before_decoding(run):
  """A PNG declaring 16000 x 16000 pixels is refused with the limit stated, from its header: it has no
  pixels, so had it been decoded the error would be the PNG decoder's. Other sizes than the model's serve."""
  workdir, _, _ = run
  serve = export_lib.load(os.path.join(workdir, "export")).signatures["serve_bytes"]
  header = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR" + (16000).to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0, 0, 0, 0, 0])
  photo = tf.io.encode_png(tf.zeros([48, 40, 3], tf.uint8))
  with pytest.raises(tf.errors.InvalidArgumentError, match=r"more than the limit of [\d,]+ pixels"):
    serve(image_bytes=tf.stack([photo, tf.constant(header)]))
  assert serve(image_bytes=tf.stack([photo]))["probabilities"].shape == (1, 10)


def test_serve_examples_refuses_a_record_declaring_another_size_before_decoding(run):
  """serve_examples decoded a record's PNG whatever it declared (a 16000 x 16000 header: ~768 MB), and only
  then compared its shape with the model's."""
  workdir, _, _ = run
  serve = export_lib.load(os.path.join(workdir, "export")).signatures["serve_examples"]
  header = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR" + (16000).to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0, 0, 0, 0, 0])
  bomb = records.serialize_example(header, "png", 0, "request-0")
  with pytest.raises(tf.errors.InvalidArgumentError, match="record request-0: image declares 16000x16000, "
                                                           "expected 32x32"):
    serve(examples=tf.constant([bomb]))
  fine = records.serialize_example(tf.io.encode_png(tf.zeros([32, 32, 3], tf.uint8)).numpy(), "png", 0, "request-1")
  assert serve(examples=tf.constant([fine]))["probabilities"].shape == (1, 10)
