"""Datasets other than CIFAR-10, end to end: an image folder at 64x64 and CIFAR-100 in its official format.
The manifest carries the image shape and the class names; the model, the trainer and the export follow."""

import io
import json
import os
import pickle
import re
import tarfile

import numpy as np
import pytest
import tensorflow as tf

from configs import deep
from pipeline import manifest as manifest_lib
from pipeline import ops
from tools import evaluate as evaluate_tool
from tools import make_tfrecords
from tools import predict as predict_tool
from tools import sources
from trainer import export as export_lib
from trainer import train

CLASSES = ("bolt", "nut", "washer")


def _photo(rng, label, height, width):
  """A learnable photo of class `label`: its own colour, plus noise."""
  colour = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]][label], np.float64)
  image = colour + rng.normal(0, 25, (height, width, 3))
  return np.clip(image, 0, 255).astype(np.uint8)


def _photo_folder(root, per_class):
  """<split>/<class>/ photos of mixed sizes and formats, grey and RGBA among them."""
  rng = np.random.default_rng(0)
  sizes = [(80, 60), (50, 70), (64, 64), (120, 90)]
  for split, n in (("train", per_class), ("test", 4)):
    for label, name in enumerate(CLASSES):
      os.makedirs(os.path.join(root, split, name))
      for i in range(n):
        image = _photo(rng, label, *sizes[i % len(sizes)])
        if i % 7 == 3:  # RGBA
          encoded = tf.io.encode_png(np.concatenate([image, np.full(image.shape[:2] + (1,), 255, np.uint8)], -1))
        elif i % 7 == 5:  # grey
          encoded = tf.io.encode_png(image[..., :1])
        elif i % 2:
          encoded = tf.io.encode_jpeg(image, quality=95)
        else:
          encoded = tf.io.encode_png(image)
        tf.io.write_file(os.path.join(root, split, name, f"{i:03d}.{'jpg' if i % 2 and i % 7 not in (3, 5) else 'png'}"),
                         encoded)


def _smoke(data_dir, arg="smoke", **overrides):
  """A smoke run of one epoch without the per-evaluation figures (a 100-class confusion matrix takes
  seconds to draw)."""
  config = deep.get_config(arg)
  config.update(data_dir=data_dir, num_epochs=1, summary_worst_images=0, **overrides)
  config.input.probe_batches = 0
  return config


def test_fit_image_crops_to_the_aspect_then_resizes():
  image = tf.constant(np.arange(6 * 12 * 3).reshape(6, 12, 3) % 256, tf.uint8)
  assert ops.fit_image(image, 6, 12).numpy().tobytes() == image.numpy().tobytes()  # the size already
  square = ops.fit_image(image, 3, 3).numpy()  # the central 6x6 of the 6x12, halved
  assert square.shape == (3, 3, 3)
  expected = tf.image.resize(image[:, 3:9], [3, 3], antialias=True).numpy()
  np.testing.assert_array_equal(square, np.clip(np.round(expected), 0, 255).astype(np.uint8))


def test_test_time_views_of_images_that_are_not_square():
  import keras  # pylint: disable=g-import-not-at-top
  from trainer import views  # pylint: disable=g-import-not-at-top
  inputs = keras.Input((6, 4, 3))
  model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(inputs)))
  assert views.logits(model, tf.zeros([2, 6, 4, 3]), "flip_translate").shape == (2, 2)


def test_mixed_size_photos_without_image_size_name_the_odd_one(tmp_path):
  folder = str(tmp_path / "photos")
  _photo_folder(folder, per_class=4)
  with pytest.raises(sources.SourceError, match=r"photos: test/bolt/001.jpg: image is 50x70x3, expected 80x60x3$"):
    make_tfrecords.make(folder, str(tmp_path / "out"), num_shards=1, val_size=0)
  with pytest.raises(sources.SourceError, match=r"^--image_size=0: give H or H,W in pixels"):
    make_tfrecords.parse_image_size(["0"])
  assert make_tfrecords.parse_image_size(["64"]) == (64, 64)
  assert make_tfrecords.parse_image_size(["64", "48"]) == (64, 48)


def test_a_photo_folder_at_64px_trains_exports_and_serves_any_size(tmp_path):
  folder, data, workdir = str(tmp_path / "photos"), str(tmp_path / "data"), str(tmp_path / "run")
  _photo_folder(folder, per_class=20)
  manifest = make_tfrecords.make(folder, data, num_shards=2, val_size=6, image_size=(64, 64))
  assert manifest["image_shape"] == [64, 64, 3] and manifest["class_names"] == list(CLASSES)
  metrics = train.train_and_evaluate(_smoke(data, "64px,smoke"), workdir)

  export = os.path.join(workdir, "export")
  serve = export_lib.load(export).signatures["serving_default"]
  assert serve.structured_input_signature[1]["images"].shape.as_list() == [None, 64, 64, 3]
  assert serve.structured_outputs["probabilities"].shape.as_list() == [None, 3]
  correct, total = evaluate_tool.evaluate(export, data, "test", 100)
  assert (total, correct / total) == (metrics["test"]["count"], pytest.approx(metrics["test"]["accuracy"]))

  photo = str(tmp_path / "phone.jpg")
  tf.io.write_file(photo, tf.io.encode_jpeg(_photo(np.random.default_rng(5), 2, 300, 200)))
  (path, [(name, probability)]), = predict_tool.predict(export, [photo])
  assert path == photo and name in CLASSES and 0.0 <= probability <= 1.0
  with pytest.raises(manifest_lib.ManifestError, match=r"takes 64x64x3 images; .* holds 32x32x3 images"):
    cifar = str(tmp_path / "cifar")
    make_tfrecords.make("synthetic", cifar, num_shards=1, val_size=0, synthetic_sizes=(40, 20))
    evaluate_tool.evaluate(export, cifar, "test", 100)


def _cifar100_archive(path, rng, train_size=300, test_size=100, meta=None):
  """A small archive in the official cifar-100-python layout; `meta` replaces its meta member's contents."""
  fine_names = [f"fine{i:02d}" for i in range(100)]
  coarse_names = [f"coarse{i:02d}" for i in range(20)]

  def batch(n):
    fine = rng.integers(0, 100, n)
    return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"fine_labels": fine.tolist(),
            b"coarse_labels": (fine // 5).tolist(), b"filenames": [b"x.png"] * n}

  with tarfile.open(path, "w:gz") as tar:
    for name, blob in (("train", batch(train_size)), ("test", batch(test_size)),
                       ("meta", meta or {b"fine_label_names": [n.encode() for n in fine_names],
                                         b"coarse_label_names": [n.encode() for n in coarse_names]})):
      data = pickle.dumps(blob, protocol=4)  # 5 names numpy's _frombuffer, which the official batches do not
      info = tarfile.TarInfo(f"cifar-100-python/{name}")
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return fine_names, coarse_names


def test_cifar100_in_its_official_format_to_a_100_class_export(tmp_path):
  archive = str(tmp_path / "cifar-100-python.tar.gz")
  fine, coarse = _cifar100_archive(archive, np.random.default_rng(0))
  coarse_manifest = make_tfrecords.make(archive, str(tmp_path / "coarse"), num_shards=1, val_size=20,
                                        label="coarse")
  assert coarse_manifest["class_names"] == coarse and len(coarse_manifest["splits"]["train"]["class_counts"]) == 20
  data, workdir = str(tmp_path / "fine"), str(tmp_path / "run")
  manifest = make_tfrecords.make(archive, data, num_shards=2, val_size=100)
  assert manifest["class_names"] == fine and manifest["source"]["kind"] == "cifar100_python_fine"
  assert sum(manifest["splits"]["validation"]["class_counts"]) == 100
  make_tfrecords.verify(data)
  train.train_and_evaluate(_smoke(data, export=True), workdir)
  model = export_lib.load(os.path.join(workdir, "export"))
  assert [n.decode() for n in model.class_names.numpy()] == fine
  images = tf.zeros([2, 32, 32, 3], tf.uint8)
  assert model.signatures["serving_default"](images=images)["probabilities"].shape == (2, 100)
  cifar10 = str(tmp_path / "cifar10")
  make_tfrecords.make("synthetic", cifar10, num_shards=1, val_size=0, synthetic_sizes=(40, 20))
  with pytest.raises(manifest_lib.ManifestError, match=r"was trained on other classes than .* \(100 and 10 classes"):
    evaluate_tool.evaluate(os.path.join(workdir, "export"), cifar10, "test", 100)


class _Opens:
  """Unpickles into a call of open(path, "w"): a file created by reading an archive."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return open, (self.path, "w")


def test_a_cifar100_pickle_that_would_run_code_is_refused(tmp_path):
  archive = str(tmp_path / "cifar-100-python.tar.gz")
  created = tmp_path / "created"
  _cifar100_archive(archive, np.random.default_rng(0), 10, 10, meta={b"fine_label_names": _Opens(str(created))})
  with pytest.raises(sources.SourceError, match=r"cifar-100-python/meta: refused to unpickle io.open \(only the"):
    make_tfrecords.make(archive, str(tmp_path / "out"))
  assert not created.exists() and not (tmp_path / "out").exists()


def test_shards_of_one_class_written_elsewhere_are_refused_at_start(tmp_path):
  """A manifest of one class name (shards from another tool): refused before the run makes its workdir."""
  data, workdir = str(tmp_path / "data"), str(tmp_path / "run")
  make_tfrecords.make("synthetic", data, num_shards=1, val_size=10, synthetic_sizes=(40, 10))
  path = os.path.join(data, manifest_lib.FILENAME)
  with open(path) as f:
    manifest = json.load(f)
  manifest["class_names"] = ["cat"]
  with open(path, "w") as f:
    json.dump(manifest, f)
  expected = f"^{re.escape(path)}: 1 class \\(cat\\); a classifier needs at least 2$"
  with pytest.raises(manifest_lib.ManifestError, match=expected):
    manifest_lib.load(data)
  with pytest.raises(manifest_lib.ManifestError, match=expected):
    train.train_and_evaluate(_smoke(data), workdir)
  assert not os.path.exists(workdir)


def test_tfds_takes_other_datasets(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  with tfds.testing.mock_data(num_examples=30):
    fine = make_tfrecords.make("tfds", str(tmp_path / "fine"), num_shards=1, val_size=0, dataset="cifar100")
    coarse = make_tfrecords.make("tfds", str(tmp_path / "coarse"), num_shards=1, val_size=0, dataset="cifar100",
                                 label="coarse")
  assert fine["source"]["checksum"].startswith("tfds:cifar100:") and len(fine["class_names"]) == 100
  assert len(coarse["class_names"]) == 20
