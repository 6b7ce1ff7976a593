"""make_tfrecords: every source format, the stratified split, idempotent shards, --verify."""

import io
import os
import pickle
import re
import signal
import struct
import subprocess
import sys
import tarfile
import time

from absl import flags
import numpy as np
import pytest
import tensorflow as tf

from pipeline import cifar10
from pipeline import input_pipeline
from pipeline import manifest as manifest_lib
from pipeline import records
from tools import make_tfrecords
from tools import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(rng, n):
  return rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def _add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def _dumps(obj) -> bytes:
  # Protocol 4 at most: numpy's arrays then unpickle as the official batches' do; 5 (Python 3.14's
  # default) names numpy's _frombuffer, which the python archive reader refuses.
  return pickle.dumps(obj, protocol=4)


def _python2_dumps(fields: dict) -> bytes:
  """`fields` pickled as Python 2 pickled the official batches: protocol 2, str (our bytes) as
  SHORT_BINSTRING or BINSTRING, uint8 arrays rebuilt by numpy.core.multiarray._reconstruct."""
  def string(b):
    return (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<i", len(b))) + b

  def value(v):
    if isinstance(v, bytes):
      return string(v)
    if isinstance(v, (int, np.integer)):
      return b"J" + struct.pack("<i", v)
    if isinstance(v, list):
      return b"](" + b"".join(value(x) for x in v) + b"e"
    return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R(K\x01"
            + value(v.shape[0]) + value(v.shape[1]) + b"\x86cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R"
            b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89" + string(v.tobytes()) + b"tb")

  return b"\x80\x02}(" + b"".join(string(k) + value(v) for k, v in fields.items()) + b"u."


def _official_archive(path, fmt, per_batch=20, seed=0, dumps=_dumps):
  """A small archive in the official layout, python batches pickled by `dumps`; returns (train images,
  train labels, test images, labels)."""
  rng = np.random.default_rng(seed)
  batches = [(_images(rng, per_batch), rng.integers(0, 10, per_batch)) for _ in range(6)]
  with tarfile.open(path, "w:gz") as tar:
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name, (images, labels) in zip(names, batches):
      chw = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
      if fmt == "python":
        blob = dumps({b"data": chw, b"labels": labels.tolist(), b"filenames": [b"x.png"] * len(labels)})
        _add(tar, f"cifar-10-batches-py/{name}", blob)
      else:
        rows = np.concatenate([labels.astype(np.uint8)[:, None], chw], axis=1)
        _add(tar, f"cifar-10-batches-bin/{name}.bin", rows.tobytes())
    if fmt == "python":
      _add(tar, "cifar-10-batches-py/batches.meta",
           dumps({b"label_names": [n.encode() for n in cifar10.CLASS_NAMES]}))
    else:
      _add(tar, "cifar-10-batches-bin/batches.meta.txt", "\n".join(cifar10.CLASS_NAMES).encode() + b"\n")
  train = batches[:5]
  return (np.concatenate([b[0] for b in train]), np.concatenate([b[1] for b in train]),
          batches[5][0], batches[5][1])


def _read_split(data_dir, split):
  """(ids, images, labels) of a split, sorted by id."""
  manifest = manifest_lib.load(data_dir)
  ids, images, labels = [], [], []
  for path in manifest_lib.split_files(data_dir, manifest, split):
    for serialized in tf.data.TFRecordDataset(path).batch(1000):
      features = records.parse_batch(serialized)
      ids += [i.decode() for i in features[records.ID].numpy()]
      images.append(records.decode_batch(features[records.ENCODED], features[records.FORMAT]).numpy())
      labels.append(features[records.LABEL].numpy())
  order = np.argsort(ids)
  return [ids[i] for i in order], np.concatenate(images)[order], np.concatenate(labels)[order]


@pytest.mark.parametrize("fmt", ["python", "binary"])
def test_official_archives_round_trip(tmp_path, fmt):
  archive = str(tmp_path / f"cifar-10-{fmt}.tar.gz")
  train_x, train_y, test_x, test_y = _official_archive(archive, fmt)
  out = str(tmp_path / "out")
  manifest = make_tfrecords.make(archive, out, num_shards=2, val_size=10)
  assert manifest["source"]["kind"] == f"cifar10_{fmt}"
  assert {k: v["num_examples"] for k, v in manifest["splits"].items()} == {
      "train": 90, "validation": 10, "test": 20}
  ids, images, labels = _read_split(out, "test")
  assert ids == [f"test_{i:05d}" for i in range(20)]
  np.testing.assert_array_equal(images, test_x)
  np.testing.assert_array_equal(labels, test_y)
  # train + validation together are exactly the source's train split, pixel for pixel
  t_ids, t_images, t_labels = _read_split(out, "train")
  v_ids, v_images, v_labels = _read_split(out, "validation")
  index = [int(i.split("_")[1]) for i in t_ids + v_ids]
  assert sorted(index) == list(range(100))
  np.testing.assert_array_equal(np.concatenate([t_images, v_images]), train_x[index])
  np.testing.assert_array_equal(np.concatenate([t_labels, v_labels]), train_y[index])


def test_the_python_archive_as_python_2_pickled_it(tmp_path):
  """The official python batches come from Python 2: they still load through the restricted unpickler."""
  archive = str(tmp_path / "cifar-10-python.tar.gz")
  train_x, train_y, test_x, test_y = _official_archive(archive, "python", per_batch=4, dumps=_python2_dumps)
  source = sources.load(archive)
  assert source.class_names == cifar10.CLASS_NAMES
  np.testing.assert_array_equal(source.splits["train"].images, train_x)
  np.testing.assert_array_equal(source.splits["train"].labels, train_y)
  np.testing.assert_array_equal(source.splits["test"].images, test_x)
  np.testing.assert_array_equal(source.splits["test"].labels, test_y)


def _image_folder(root, classes, per_class, ext, seed=0):
  rng = np.random.default_rng(seed)
  written = {}
  for split in ("train", "test"):
    for name in classes:
      os.makedirs(os.path.join(root, split, name), exist_ok=True)
      for i in range(per_class):
        image = _images(rng, 1)[0]
        encoded = tf.io.encode_png(image) if ext == "png" else tf.io.encode_jpeg(image, quality=95)
        rel = f"{split}/{name}/{i:04d}.{ext}"
        tf.io.write_file(os.path.join(root, rel), encoded)
        written[rel] = tf.io.decode_image(encoded, channels=3).numpy()
  return written


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_image_folder_and_tar(tmp_path, ext):
  folder = str(tmp_path / "images" / "cifar10-jpeg")  # one leading directory, as in the shared data
  written = _image_folder(folder, ["cat", "dog", "ship"], 4, ext)
  tar_path = str(tmp_path / "images.tar.gz")
  with tarfile.open(tar_path, "w:gz") as tar:
    tar.add(str(tmp_path / "images"), arcname=".")
  for source, out in ((folder, tmp_path / "from_folder"), (tar_path, tmp_path / "from_tar")):
    manifest = make_tfrecords.make(source, str(out), num_shards=1, val_size=0, encoding="png")
    assert manifest["class_names"] == list(cifar10.CLASS_NAMES)  # CIFAR-10 names keep CIFAR-10 ids
    ids, images, labels = _read_split(str(out), "test")
    assert ids == sorted(r for r in written if r.startswith("test/"))
    np.testing.assert_array_equal(images, np.stack([written[i] for i in ids]))
    expected = [cifar10.CLASS_NAMES.index(i.split("/")[1]) for i in ids]
    np.testing.assert_array_equal(labels, expected)


def test_other_class_names_are_sorted():
  assert sources.class_ids({"zebra", "apple", "cat"}) == ("apple", "cat", "zebra")
  assert sources.class_ids({"ship", "cat"}) == cifar10.CLASS_NAMES
  assert sources.class_ids({f"c{i:02d}" for i in range(37)}) == tuple(f"c{i:02d}" for i in range(37))  # any count


def test_unreadable_image_is_named(tmp_path):
  folder = tmp_path / "imgs"
  _image_folder(str(folder), ["cat"], 2, "png")
  (folder / "train" / "cat" / "broken.png").write_bytes(b"not a png")
  with pytest.raises(sources.SourceError, match=r"train/cat/broken.png: not a decodable image"):
    make_tfrecords.make(str(folder), str(tmp_path / "out"), num_shards=1, val_size=0)


def test_tfds_source(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  with tfds.testing.mock_data(num_examples=30):
    manifest = make_tfrecords.make("tfds", str(tmp_path / "out"), num_shards=2, val_size=10)
  assert manifest["source"]["checksum"].startswith("tfds:cifar10:")
  assert manifest["splits"]["train"]["num_examples"] == 20
  assert manifest["splits"]["test"]["num_examples"] == 30


def test_synthetic_is_learnable():
  """A nearest-class-mean classifier, fitted on train, beats chance by far on test."""
  source = sources.make_synthetic(0, 2000, 500)
  train, test = source.splits["train"], source.splits["test"]
  means = np.stack([train.images[train.labels == k].reshape(-1, 3072).mean(0) for k in range(10)])
  dist = ((test.images.reshape(-1, 1, 3072) - means[None]) ** 2).sum(-1)
  assert (dist.argmin(1) == test.labels).mean() > 0.5


def test_validation_split_is_stratified_and_seeded():
  labels = np.repeat(np.arange(10), [300, 300, 300, 300, 300, 100, 100, 100, 100, 100])
  split = sources.Split(np.zeros((2000, 32, 32, 3), np.uint8), labels, [f"train_{i:05d}" for i in range(2000)])
  out = make_tfrecords.split_validation(split, 200, seed=3)
  assert len(out["validation"]) == 200 and len(out["train"]) == 1800
  np.testing.assert_array_equal(np.bincount(out["validation"].labels), [30] * 5 + [10] * 5)
  assert not set(out["train"].ids) & set(out["validation"].ids)
  again = make_tfrecords.split_validation(split, 200, seed=3)
  assert again["validation"].ids == out["validation"].ids
  other = make_tfrecords.split_validation(split, 200, seed=4)
  assert other["validation"].ids != out["validation"].ids
  assert "validation" not in make_tfrecords.split_validation(split, 0, seed=3)


def test_rerun_is_byte_identical_and_says_so(tmp_path, capsys):
  out = str(tmp_path / "out")
  first = make_tfrecords.make("synthetic", out, num_shards=3, val_size=50, synthetic_sizes=(300, 60))
  capsys.readouterr()
  second = make_tfrecords.make("synthetic", out, num_shards=3, val_size=50, synthetic_sizes=(300, 60))
  assert first == second
  assert "all 5 shards are byte-identical" in capsys.readouterr().out
  assert not [n for n in os.listdir(out) if n.startswith(".tmp")]


def test_rerun_with_fewer_shards_removes_stale_ones(tmp_path):
  out = str(tmp_path / "out")
  make_tfrecords.make("synthetic", out, num_shards=4, val_size=50, synthetic_sizes=(300, 60))
  make_tfrecords.make("synthetic", out, num_shards=2, val_size=50, synthetic_sizes=(300, 60))
  assert manifest_lib.list_shards(out, "train") == [manifest_lib.shard_name("train", i, 2) for i in range(2)]
  manifest_lib.load(out)  # disk and manifest agree


def _run(*args):
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))


@pytest.fixture
def refused(program):
  """`python -m tools.make_tfrecords ARGS` in this process (conftest's `program`). The program itself runs in
  test_missing_source_is_one_line_error, the forged dtypes' (memory safety: a regression must not take the
  test's process down), the file-size limit's and the stop signals' tests."""
  return lambda *args: program(make_tfrecords, *args)


def test_verify_catches_a_changed_shard(tmp_path, refused):
  out = str(tmp_path / "out")
  make_tfrecords.make("synthetic", out, num_shards=2, val_size=50, synthetic_sizes=(300, 60))
  make_tfrecords.verify(out)
  shard = os.path.join(out, manifest_lib.shard_name("train", 1, 2))
  data = bytearray(open(shard, "rb").read())
  data[100] ^= 0xFF
  open(shard, "wb").write(bytes(data))
  result = refused("--verify", f"--output_dir={out}")
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith(f"make_tfrecords: error: {shard}: sha256")


def test_missing_source_is_one_line_error(tmp_path):
  result = _run("tools.make_tfrecords", f"--source={tmp_path}/nope.tar.gz", f"--output_dir={tmp_path}/out")
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == f"make_tfrecords: error: {tmp_path}/nope.tar.gz: no such file or folder"
  assert "Traceback" not in result.stderr
  assert not os.path.exists(f"{tmp_path}/out/manifest.json")


def test_eval_dataset_reads_every_record_once(synthetic_dir):
  manifest = manifest_lib.load(synthetic_dir)
  mean, std = manifest_lib.normalization(manifest)
  labels = np.concatenate([b["labels"].numpy() for b in input_pipeline.build_eval_dataset(
      synthetic_dir, "validation", batch_size=64, mean=mean, std=std)])
  np.testing.assert_array_equal(np.bincount(labels, minlength=10),
                                manifest["splits"]["validation"]["class_counts"])


def test_committed_sample_of_real_images(tmp_path):
  """data/cifar10-sample.tar.gz, the README's offline default: 500 real JPEGs, 50 per class."""
  out = str(tmp_path / "sample")
  manifest = make_tfrecords.make(os.path.join(ROOT, "data", "cifar10-sample.tar.gz"), out, num_shards=2,
                                 val_size=100)
  assert manifest["source"]["kind"] == "image_tar"
  assert manifest["splits"]["train"]["class_counts"] == [40] * 10
  assert manifest["splits"]["validation"]["class_counts"] == [10] * 10
  make_tfrecords.verify(out)


def test_wrong_size_image_is_named(tmp_path):
  folder = tmp_path / "imgs"
  _image_folder(str(folder), ["cat"], 1, "png")
  tf.io.write_file(str(folder / "train" / "cat" / "big.png"), tf.io.encode_png(tf.zeros([64, 64, 3], tf.uint8)))
  with pytest.raises(sources.SourceError, match=r"train/cat/big.png: image is 64x64x3, expected 32x32x3$"):
    make_tfrecords.make(str(folder), str(tmp_path / "out"), num_shards=1, val_size=0)


def test_label_out_of_range_in_an_archive_is_named(tmp_path):
  archive = str(tmp_path / "cifar-10-python.tar.gz")
  _official_archive(archive, "python")
  with tarfile.open(archive) as tar:
    members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
  batch = pickle.loads(members["cifar-10-batches-py/data_batch_1"], encoding="bytes")
  batch[b"labels"][3] = 12
  members["cifar-10-batches-py/data_batch_1"] = _dumps(batch)
  with tarfile.open(archive, "w:gz") as tar:
    for name, data in members.items():
      _add(tar, name, data)
  with pytest.raises(sources.SourceError, match=r"^train_00003: label 12 is outside 0..9$"):
    make_tfrecords.make(archive, str(tmp_path / "out"), num_shards=1, val_size=0)


class _Touch:
  """Unpickles into a call of os.system: what a crafted archive could run."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return os.system, (f"touch {self.path}",)


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path, refused):
  """The python archives were read with pickle.loads, which runs whatever callable a pickle names: a
  data_batch_1 like this one ran its command, and only then was found not to be a CIFAR-10 batch."""
  archive = str(tmp_path / "cifar-10-python.tar.gz")
  _official_archive(archive, "python", per_batch=2)
  with tarfile.open(archive) as tar:
    members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
  marker = tmp_path / "ran"
  members["cifar-10-batches-py/data_batch_1"] = pickle.dumps({b"data": _Touch(marker), b"labels": [0, 1]})
  with tarfile.open(archive, "w:gz") as tar:
    for name, data in members.items():
      _add(tar, name, data)
  out = tmp_path / "out"
  result = refused(f"--source={archive}", f"--output_dir={out}")
  assert not marker.exists()
  assert result.returncode == 1, result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      f"make_tfrecords: error: {archive}: cifar-10-batches-py/data_batch_1: refused to unpickle posix.system "
      "(only the CIFAR batch format is read)")
  assert not out.exists()


@pytest.mark.parametrize("dtype", [b"O8", b"f8"])
def test_an_array_of_another_dtype_is_refused_before_numpy_builds_it(tmp_path, dtype):
  """numpy's dtype.__setstate__ takes a pickle's flags unchecked: an object dtype without its refcount flag
  made the batch's bytes pointers, which np.asarray then followed."""
  archive = str(tmp_path / "cifar-10-python.tar.gz")
  _official_archive(archive, "python", per_batch=2)
  with tarfile.open(archive) as tar:
    members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
  pointers = np.full((2, 3072), 0x4141414141414141, np.uint64)  # 8 bytes an element, as O8 and f8 take
  forged = _python2_dumps({b"data": pointers, b"labels": [0, 1]})
  members["cifar-10-batches-py/data_batch_1"] = forged.replace(b"U\x02u1", b"U\x02" + dtype)
  with tarfile.open(archive, "w:gz") as tar:
    for name, data in members.items():
      _add(tar, name, data)
  result = _run("tools.make_tfrecords", f"--source={archive}", f"--output_dir={tmp_path / 'out'}")
  assert result.returncode == 1 and "Traceback" not in result.stderr, (result.returncode, result.stderr[-2000:])
  assert result.stderr.strip().splitlines()[-1] == (
      f"make_tfrecords: error: {archive}: cifar-10-batches-py/data_batch_1: refused an array of dtype "
      f"{dtype.decode()!r} (the CIFAR batches hold integers only)")


def test_a_source_of_one_class_is_refused(tmp_path, refused):
  """One class directory was written as a dataset of 1 class (exit 0, 4 shards): nothing to tell apart."""
  folder = str(tmp_path / "bolts")
  _image_folder(folder, ["bolt"], 2, "png")
  out = tmp_path / "out"
  result = refused(f"--source={folder}", f"--output_dir={out}", "--val_size=0")
  assert result.returncode == 1, result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      f"make_tfrecords: error: {folder}: 1 class (bolt); a classifier needs at least 2: an image folder or tar "
      "holds a <split>/<class_name>/ folder per class")
  assert not out.exists()


def test_a_source_with_only_test_images_writes_test_shards(tmp_path):
  """A held-out set to score with tools.evaluate: test/ only, no train/ to carve a validation split from."""
  folder = str(tmp_path / "held_out")
  written = _image_folder(folder, ["cat", "dog"], 3, "png")
  for rel in [r for r in written if r.startswith("train/")]:
    os.remove(os.path.join(folder, rel))
  manifest = make_tfrecords.make(folder, str(tmp_path / "out"), num_shards=4)
  assert list(manifest["splits"]) == ["test"] and manifest["splits"]["test"]["num_examples"] == 6
  ids, _, _ = _read_split(str(tmp_path / "out"), "test")
  assert ids == sorted(r for r in written if r.startswith("test/"))
  from configs import deep  # pylint: disable=g-import-not-at-top
  from trainer import train  # pylint: disable=g-import-not-at-top
  config = deep.get_config("smoke")
  config.data_dir = str(tmp_path / "out")
  with pytest.raises(train.TrainingError, match=r"has no train split \(it has test\)"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_hidden_files_in_a_tar_are_not_images(tmp_path):
  """What macOS puts in a tar it makes: AppleDouble `._name.png` beside each image, __MACOSX/, .DS_Store."""
  folder = str(tmp_path / "imgs")
  written = _image_folder(folder, ["cat", "dog"], 2, "png")
  archive = str(tmp_path / "mac.tar.gz")
  with tarfile.open(archive, "w:gz") as tar:
    tar.add(folder, arcname="photos")
    for rel in written:
      head, name = os.path.split(rel)
      _add(tar, f"photos/{head}/._{name}", b"\x00\x05\x16\x07 AppleDouble")
      _add(tar, f"__MACOSX/photos/{head}/._{name}", b"\x00\x05\x16\x07 AppleDouble")
    _add(tar, "photos/train/cat/.DS_Store", b"\x00\x00\x00\x01Bud1")
  make_tfrecords.make(archive, str(tmp_path / "out"), num_shards=1, val_size=0)
  ids, _, _ = _read_split(str(tmp_path / "out"), "train")
  assert ids == sorted(r for r in written if r.startswith("train/"))


def test_same_file_names_in_two_folders_get_distinct_ids(tmp_path):
  root = tmp_path / "photos"
  for i, shop in enumerate(("shop_a", "shop_b")):
    _image_folder(str(root / shop), ["cat"], 2, "png", seed=i)
  make_tfrecords.make(str(root), str(tmp_path / "out"), num_shards=1, val_size=0)
  ids, images, _ = _read_split(str(tmp_path / "out"), "train")
  assert ids == ["shop_a/train/cat/0000.png", "shop_a/train/cat/0001.png", "shop_b/train/cat/0000.png",
                 "shop_b/train/cat/0001.png"]
  assert not np.array_equal(images[0], images[2])


def _limit_file_size(limit):
  def limit_file_size():
    import resource  # pylint: disable=g-import-not-at-top
    import signal  # pylint: disable=g-import-not-at-top
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
  return limit_file_size


def test_a_failed_rerun_leaves_the_dataset_usable_and_says_why_in_one_line(tmp_path):
  """A re-run that cannot write its shards (here a file-size limit, as a full disk would) is one line
  naming the shard; the old manifest and shards are as they were and nothing temporary is left."""
  out = str(tmp_path / "out")
  make_tfrecords.make("synthetic", out, num_shards=2, val_size=50, synthetic_sizes=(300, 60))
  before = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)}
  result = subprocess.run([sys.executable, "-m", "tools.make_tfrecords", "--source=synthetic", f"--output_dir={out}",
                           "--num_shards=2", "--val_size=50", "--synthetic_train_size=300",
                           "--synthetic_test_size=60", "--encoding=png"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size(50_000),
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  assert result.returncode == 1, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert re.fullmatch(rf"make_tfrecords: error: {re.escape(out)}/\w+-\d+-of-\d+\.tfrecord: cannot be written "
                      rf"\(File too large\); the data in {re.escape(out)} is as it was", last), last
  assert "Traceback" not in result.stderr
  assert {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)} == before
  make_tfrecords.verify(out)


@pytest.mark.parametrize("flag,expected", [
    ("--num_shards=0", "flag --num_shards=0: 0 is not a positive integer"),  # was a numpy traceback
    ("--workers=-1", "flag --workers=-1: -1 is not a non-negative integer"),  # was a ThreadPoolExecutor traceback
])
def test_flags_out_of_range_are_named(tmp_path, refused, flag, expected):
  with pytest.raises(flags.IllegalFlagValueError, match=f"^{re.escape(expected)}$"):
    refused("--source=synthetic", f"--output_dir={tmp_path}/out", flag)


def test_make_refuses_an_empty_output_dir_before_writing_anything(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(sources.SourceError, match="^--output_dir is empty: give the directory the shards and manifest "
                                                "go to$"):
    make_tfrecords.make("synthetic", "", num_shards=1, val_size=10, synthetic_sizes=(50, 10))
  assert not os.listdir(tmp_path)


def test_output_dir_that_is_a_file_is_one_line(tmp_path, refused):
  (tmp_path / "out").write_text("precious")
  result = refused("--source=synthetic", f"--output_dir={tmp_path}/out", "--synthetic_train_size=100",
                   "--synthetic_test_size=10", "--val_size=0")
  assert result.returncode == 1, result.stderr
  assert result.stderr.strip().splitlines()[-1] == f"make_tfrecords: error: --output_dir={tmp_path}/out is a file, not a directory"
  assert (tmp_path / "out").read_text() == "precious"


def test_a_split_smaller_than_the_shard_count_gets_one_shard_per_image(tmp_path):
  """Was refused: "1 images cannot fill 16 shards" (3cf2a86) for a held-out set of one image."""
  folder = str(tmp_path / "one")
  written = _image_folder(folder, ["cat"], 1, "png")
  os.remove(os.path.join(folder, next(r for r in written if r.startswith("train/"))))
  manifest = make_tfrecords.make(folder, str(tmp_path / "out"))  # --num_shards's default, 16
  assert manifest["splits"]["test"] == dict(manifest["splits"]["test"], num_examples=1, num_shards=1)
  assert make_tfrecords.shard_counts({"train": 3, "test": 1}, 16) == {"train": 3, "test": 1}


def test_a_rerun_never_removes_a_split_it_does_not_write(tmp_path, refused):
  """A test-only source (or --val_size=0) written over an earlier dataset removed its train and validation
  shards without a word (3cf2a86); now it is refused, naming them, and the dataset is left whole."""
  out = str(tmp_path / "out")
  make_tfrecords.make("synthetic", out, num_shards=2, val_size=50, synthetic_sizes=(300, 60))
  before = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)}
  folder = str(tmp_path / "held_out")
  written = _image_folder(folder, ["cat", "dog"], 2, "png")
  for rel in [r for r in written if r.startswith("train/")]:
    os.remove(os.path.join(folder, rel))
  result = refused(f"--source={folder}", f"--output_dir={out}")
  assert result.returncode == 1, result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      f"make_tfrecords: error: --output_dir={out} holds train and validation shards that this source and these "
      f"flags do not write; writing there would remove them: give another --output_dir, or delete {out}/train-* "
      "yourself first")
  with pytest.raises(sources.SourceError, match="holds validation shards"):
    make_tfrecords.make("synthetic", out, num_shards=2, val_size=0, synthetic_sizes=(300, 60))
  assert {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)} == before


@pytest.mark.parametrize("args,expected", [
    (["--source=synthetic", "--image_size=4"],  # was accepted; the trainer failed later
     "make_tfrecords: error: --image_size=4: give H or H,W in pixels, each at least 8, e.g. 64 or 64,48"),
    (["--source=synthetic", "--label=coarse"],  # was silently ignored
     "make_tfrecords: error: --label=coarse applies to CIFAR-100 only (--source=tfds --dataset=cifar100, or "
     "cifar-100-python.tar.gz); synthetic has one label per image"),
])
def test_flags_that_do_not_apply_are_refused(tmp_path, refused, args, expected):
  result = refused(f"--output_dir={tmp_path}/out", *args)
  assert result.returncode == 1, result.stderr
  assert result.stderr.strip().splitlines()[-1] == expected
  assert not os.path.exists(tmp_path / "out")


def test_coarse_labels_on_an_image_folder_or_a_cifar10_archive_are_refused(tmp_path):
  folder = str(tmp_path / "images")
  _image_folder(folder, ["cat", "dog"], 1, "png")
  archive = str(tmp_path / "cifar-10-python.tar.gz")
  _official_archive(archive, "python", per_batch=2)
  for source in (folder, archive):
    with pytest.raises(sources.SourceError, match=f"{re.escape(source)} has one label per image"):
      make_tfrecords.make(source, str(tmp_path / "out"), label="coarse")


def test_tiny_images_are_refused_unless_fitted(tmp_path):
  folder = str(tmp_path / "tiny")
  for split in ("train", "test"):
    for name in ("cat", "dog"):
      os.makedirs(os.path.join(folder, split, name))
      tf.io.write_file(os.path.join(folder, split, name, "a.png"), tf.io.encode_png(tf.zeros([4, 4, 3], tf.uint8)))
  with pytest.raises(sources.SourceError, match="images of 4x4 pixels; the models need at least 8x8"):
    make_tfrecords.make(folder, str(tmp_path / "out"), val_size=0)
  assert make_tfrecords.make(folder, str(tmp_path / "out"), val_size=0, image_size=(8, 8))["image_shape"] == [8, 8, 3]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_signal_stops_the_writing_at_once_and_keeps_the_old_dataset(tmp_path, sig):
  """SIGINT went on for 4.6 s and finished every shard (3cf2a86). Now the writers stop between records, the
  temporary files go, the old dataset stays whole, and the exit code says so (128 + the signal)."""
  out = str(tmp_path / "out")
  make_tfrecords.make("synthetic", out, num_shards=2, val_size=50, synthetic_sizes=(300, 60))
  before = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)}
  proc = subprocess.Popen([sys.executable, "-m", "tools.make_tfrecords", "--source=synthetic", f"--output_dir={out}",
                           "--synthetic_train_size=40000", "--synthetic_test_size=10", "--num_shards=64",
                           "--encoding=png", "--workers=1"], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  for line in proc.stderr:
    if "shards 1/" in line:  # writing is under way: one shard done, ~10 s of shards to go
      sent = time.monotonic()
      proc.send_signal(sig)
      break
  err = proc.communicate(timeout=120)[1]
  assert proc.returncode == 130, err[-2000:]
  assert time.monotonic() - sent < 5 and "wrote " not in err
  assert err.strip().splitlines()[-1] == (f"make_tfrecords: stopped by {signal.Signals(sig).name}: the shards under "
                                          f"way were removed; {out} is as it was")
  assert {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)} == before
