"""Readers for every source make_tfrecords accepts; each returns decoded uint8 RGB images of one size.

Sources (docs/interfaces.md): `tfds` (the official download through tensorflow-datasets: CIFAR-10 by
default, or another image-classification set of one image size), the official `cifar-10-python.tar.gz` /
`cifar-10-binary.tar.gz` / `cifar-100-python.tar.gz` archives, a folder or `.tar[.gz]` of
`<split>/<class_name>/<image>` files (any class names, any image sizes with `image_size`), and `synthetic`
(learnable fake data, no download).
"""

import trainer  # pylint: disable=unused-import  # first: see tools/__init__.py

import concurrent.futures
import dataclasses
import hashlib
import io
import math
import os
import pickle
import re
import tarfile

import numpy as np
import tensorflow as tf

from pipeline import cifar10
from pipeline import cpus
from pipeline import fileio
from pipeline import ops

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_PY_DIR = "cifar-10-batches-py"
_PY100_DIR = "cifar-100-python"
LABELS = ("fine", "coarse")  # CIFAR-100's 100 classes or its 20 superclasses
_BIN_DIR = "cifar-10-batches-bin"
_TFDS_BATCH = 1000  # images per read from tensorflow-datasets
_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))


class SourceError(ValueError):
  """Bad or unreadable input; the message names the culprit."""


@dataclasses.dataclass
class Split:
  """One split of a source: decoded images, their labels and unique ids."""
  images: np.ndarray  # uint8 [N, H, W, 3]
  labels: np.ndarray  # int64 [N]
  ids: list[str]

  def __len__(self) -> int:
    return len(self.labels)


@dataclasses.dataclass
class Source:
  """A loaded source: what it was, its checksum, class names and its splits (`train`, `test` or both)."""
  name: str
  kind: str
  checksum: str
  class_names: tuple[str, ...]
  splits: dict[str, Split]

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(next(iter(self.splits.values())).images.shape[1:])


def load(source: str, *, seed: int = 0, synthetic_sizes: tuple[int, int] = (50000, 10000),
         image_size: tuple[int, int] | None = None, dataset: str = "cifar10", label: str = "fine") -> Source:
  """Loads `source` (see the module docstring) into memory.

  Args:
    source: tfds | synthetic | a path.
    seed: of the synthetic data.
    synthetic_sizes: train and test images of the synthetic data.
    image_size: (height, width) every image of an image folder or tar is fitted to (ops.fit_image);
      None: all must have the size most of them have.
    dataset: the tensorflow-datasets name, with `tfds`.
    label: CIFAR-100's `fine` (100 classes) or `coarse` (20 superclasses) labels.
  """
  if label not in LABELS:
    raise SourceError(f"--label={label!r} is not one of: {', '.join(LABELS)}")
  if source == "tfds":
    if label != "fine" and dataset != "cifar100":
      raise _one_label(f"tfds:{dataset}")
    return load_tfds(dataset, label=label)
  if source == "synthetic":
    if label != "fine":
      raise _one_label(source)
    return make_synthetic(seed, *synthetic_sizes)
  if not source:
    raise SourceError("--source is empty: give tfds, synthetic, or the path of an archive, image folder or tar")
  try:
    fileio.check_bucket(source)
  except fileio.StorageError as e:
    raise SourceError(str(e)) from None
  if not tf.io.gfile.exists(source):
    raise SourceError(f"{source}: no such file or folder")
  if tf.io.gfile.isdir(source):
    if label != "fine":
      raise _one_label(source)
    return _load_image_files(source, "folder", _sha256_of_entries, _walk_folder(source), image_size)
  loaded = _load_tar(source, image_size, label)
  if label != "fine" and not loaded.kind.startswith("cifar100"):
    raise _one_label(source)
  return loaded


def _one_label(source: str) -> SourceError:
  return SourceError("--label=coarse applies to CIFAR-100 only (--source=tfds --dataset=cifar100, or "
                     f"cifar-100-python.tar.gz); {source} has one label per image")


# --- tensorflow-datasets -------------------------------------------------------------------------------

def load_tfds(name: str = "cifar10", data_dir: str | None = None, label: str = "fine") -> Source:
  """An image-classification set of one image size through tensorflow-datasets (downloads on first
  use): its `image` and `label` features (CIFAR-100's `coarse_label` with label="coarse")."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow import, one source)
  feature = "coarse_label" if label == "coarse" else "label"
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    builder.download_and_prepare()
    splits = {}
    for split in ("train", "test"):
      if builder.info.splits and split not in builder.info.splits:  # (tfds's mock data lists none)
        continue
      batches = list(tfds.as_numpy(builder.as_dataset(split=split, batch_size=_TFDS_BATCH, shuffle_files=False)))
      images = np.concatenate([b["image"] for b in batches]).astype(np.uint8)
      ids = ([i.decode() if isinstance(i, bytes) else str(i) for b in batches for i in b["id"]]
             if "id" in batches[0] else [f"{split}_{i:05d}" for i in range(len(images))])
      splits[split] = Split(np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images,  # grey: RGB
                            np.concatenate([b[feature] for b in batches]).astype(np.int64), ids)
  except Exception as e:  # pylint: disable=broad-except  (tfds raises many kinds; all mean "no data")
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise SourceError(f"tfds: could not download or read {name} ({first_line}); without network pass "
                      "--source=PATH to cifar-10-python.tar.gz, cifar-10-binary.tar.gz, cifar-100-python.tar.gz "
                      "or an image folder") from e
  if not splits:
    raise SourceError(f"tfds: {name} has neither a train nor a test split")
  names = tuple(builder.info.features[feature].names)
  return Source("tfds", "tfds", f"tfds:{name}:{builder.info.version}", names, splits)


# --- official archives and image tars --------------------------------------------------------------------

def _load_tar(path: str, image_size=None, label: str = "fine") -> Source:
  """Reads a tar archive once, then dispatches on what it holds."""
  with tf.io.gfile.GFile(path, "rb") as f:
    blob = f.read()
  checksum = hashlib.sha256(blob).hexdigest()
  try:
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:*") as tar:
      members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
  except (tarfile.TarError, EOFError, OSError) as e:
    reason = "not a tar, tar.gz, tar.bz2 or tar.xz file" if isinstance(e, tarfile.ReadError) else " ".join(str(e).split())
    raise SourceError(f"{path}: not a readable tar archive ({reason})") from e
  dirs = {name.split("/")[-2] for name in members if "/" in name}
  if _PY_DIR in dirs:
    return _python_archive(path, checksum, members)
  if _BIN_DIR in dirs:
    return _binary_archive(path, checksum, members)
  if _PY100_DIR in dirs:
    return _cifar100_archive(path, checksum, members, label)
  entries = [(name, lambda data=data: data) for name, data in sorted(members.items())]
  return _load_image_files(path, "image_tar", lambda _: checksum, entries, image_size)


def _member(path: str, members: dict[str, bytes], suffix: str) -> bytes:
  for name, data in members.items():
    if name == suffix or name.endswith("/" + suffix):
      return data
  raise SourceError(f"{path}: archive has no member {suffix}")


class _Dtype:
  """What a pickle asks numpy.dtype for, recorded and not built: numpy's own dtype.__setstate__ takes the
  pickle's flags unchecked, so a crafted one could make uint8 bytes pass for object pointers."""

  def __init__(self, spec, align=False, copy=False):
    del align, copy
    self.spec = spec.decode("latin-1") if isinstance(spec, bytes) else spec
    self.order = "|"

  def __setstate__(self, state):
    if isinstance(state, tuple) and len(state) > 1:
      order = state[1]
      self.order = order.decode("latin-1") if isinstance(order, bytes) else order


class _Array:
  """An ndarray as a pickle describes it (numpy's `_reconstruct` + `__setstate__`), recorded, then built
  by `array` from its bytes alone, for the integer dtypes the CIFAR batches hold."""

  INTEGER_DTYPES = ("u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8")

  def __setstate__(self, state):
    self.state = state

  def array(self, where: str) -> np.ndarray:
    try:
      _, shape, dtype, fortran, raw = self.state[:5]
    except (AttributeError, TypeError, ValueError):
      raise SourceError(f"{where}: an array the CIFAR batch format does not have") from None
    spec = dtype.spec if isinstance(dtype, _Dtype) else None
    if spec not in self.INTEGER_DTYPES or not isinstance(raw, (bytes, str)) or dtype.order not in "<>|=":
      raise SourceError(f"{where}: refused an array of dtype {spec!r} (the CIFAR batches hold integers only)")
    raw = raw.encode("latin-1") if isinstance(raw, str) else raw
    kind = np.dtype(spec).newbyteorder(dtype.order if dtype.order in "<>" else "=")
    if math.prod(shape) * kind.itemsize != len(raw):
      raise SourceError(f"{where}: an array of shape {tuple(shape)} with {len(raw)} bytes")
    return np.frombuffer(raw, kind).reshape(shape, order="F" if fortran else "C")


def _reconstruct(cls, shape, typecode):
  del cls, shape, typecode
  return _Array()


class _BatchUnpickler(pickle.Unpickler):
  """Unpickles the CIFAR python batches and nothing else: a pickle names the callables it runs, so one in a
  crafted archive could run any code. The official batches (pickled by Python 2) hold dicts, lists, bytes,
  str and ints, which need no callable, and numpy uint8 arrays, which need numpy's array reconstruction;
  re-pickled by Python 3 (protocols 3 and 4), numpy 2 names its `_core` module instead of `core`. Even
  those are not handed to numpy: they are recorded (_Array, _Dtype) and built from their bytes afterwards."""

  ALLOWED = {("numpy.core.multiarray", "_reconstruct"): _reconstruct,
             ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
             ("numpy", "ndarray"): _Array, ("numpy", "dtype"): _Dtype}

  def __init__(self, data: bytes, where: str):
    super().__init__(io.BytesIO(data), encoding="bytes")  # Python 2's str: bytes, as the batch keys are
    self.where = where

  def find_class(self, module, name):
    if (module, name) not in self.ALLOWED:
      raise SourceError(f"{self.where}: refused to unpickle {module}.{name} (only the CIFAR batch format is read)")
    return self.ALLOWED[(module, name)]


def _built(value, where: str):
  """`value` with every recorded _Array built (dicts, lists and tuples walked)."""
  if isinstance(value, _Array):
    return value.array(where)
  if isinstance(value, _Dtype):
    raise SourceError(f"{where}: a bare dtype the CIFAR batch format does not have")
  if isinstance(value, dict):
    return {k: _built(v, where) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return type(value)(_built(v, where) for v in value)
  return value


def _unpickle(path: str, members: dict[str, bytes], member: str):
  """The python archive's `member` through `_BatchUnpickler`; anything else in it is a SourceError."""
  where = f"{path}: {member}"
  try:
    return _built(_BatchUnpickler(_member(path, members, member), where).load(), where)
  except SourceError:
    raise
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
    raise SourceError(f"{where}: not a CIFAR python batch ({e!r})") from e


def _python_archive(path: str, checksum: str, members: dict[str, bytes]) -> Source:
  """`cifar-10-python.tar.gz`: pickled dicts of N x 3072 uint8 rows (CHW planes) and labels."""
  def batch(name):
    d = _unpickle(path, members, f"{_PY_DIR}/{name}")
    try:
      data = np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
      return data, np.asarray(d[b"labels"], np.int64)
    except (KeyError, TypeError, ValueError) as e:
      raise SourceError(f"{path}: member {name} is not a CIFAR-10 python batch ({e!r})") from e

  meta = _unpickle(path, members, f"{_PY_DIR}/batches.meta")
  try:
    names = tuple(n.decode() for n in meta[b"label_names"])
  except (KeyError, TypeError, AttributeError) as e:
    raise SourceError(f"{path}: member batches.meta has no label_names list ({e!r})") from None
  train = [batch(n) for n in _TRAIN_BATCHES]
  splits = {"train": _array_split("train", np.concatenate([b[0] for b in train]),
                                  np.concatenate([b[1] for b in train])),
            "test": _array_split("test", *batch("test_batch"))}
  return Source(path, "cifar10_python", checksum, names, splits)


def _binary_archive(path: str, checksum: str, members: dict[str, bytes]) -> Source:
  """`cifar-10-binary.tar.gz`: records of 1 label byte + 3072 image bytes (CHW planes)."""
  def batch(name):
    raw = np.frombuffer(_member(path, members, f"{_BIN_DIR}/{name}"), np.uint8)
    if raw.size % (cifar10.RAW_BYTES + 1):
      raise SourceError(f"{path}: member {name} is {raw.size} bytes, not a whole number of 3073-byte records")
    rows = raw.reshape(-1, cifar10.RAW_BYTES + 1)
    return rows[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), rows[:, 0].astype(np.int64)

  meta = _member(path, members, f"{_BIN_DIR}/batches.meta.txt").decode().split()
  train = [batch(f"{n}.bin") for n in _TRAIN_BATCHES]
  splits = {"train": _array_split("train", np.concatenate([b[0] for b in train]),
                                  np.concatenate([b[1] for b in train])),
            "test": _array_split("test", *batch("test_batch.bin"))}
  return Source(path, "cifar10_binary", checksum, tuple(meta), splits)


def _cifar100_archive(path: str, checksum: str, members: dict[str, bytes], label: str) -> Source:
  """`cifar-100-python.tar.gz`: pickled `train` and `test` dicts of N x 3072 uint8 rows (CHW planes) with
  fine and coarse labels, and `meta` with both name lists."""
  def split(name, num_classes):
    d = _unpickle(path, members, f"{_PY100_DIR}/{name}")
    try:
      images = np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
      return _array_split(name, images, np.asarray(d[f"{label}_labels".encode()], np.int64), num_classes)
    except (KeyError, TypeError, ValueError) as e:
      raise SourceError(f"{path}: member {name} is not a CIFAR-100 python batch ({e!r})") from e

  meta = _unpickle(path, members, f"{_PY100_DIR}/meta")
  names = tuple(n.decode() for n in meta[f"{label}_label_names".encode()])
  return Source(path, f"cifar100_python_{label}", checksum, names,
                {"train": split("train", len(names)), "test": split("test", len(names))})


def _array_split(split: str, images: np.ndarray, labels: np.ndarray, num_classes: int = cifar10.NUM_CLASSES) -> Split:
  bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
  if bad.size:
    raise SourceError(f"{split}_{bad[0]:05d}: label {labels[bad[0]]} is outside 0..{num_classes - 1}")
  return Split(np.ascontiguousarray(images), labels, [f"{split}_{i:05d}" for i in range(len(labels))])


# --- image folders -----------------------------------------------------------------------------------------

_IMAGE_PATH = re.compile(r"(?:^|/)(train|test)/([^/]+)/([^/]+)$")


def _hidden(rel: str, start: int) -> bool:
  """macOS's AppleDouble `._x.png` and `__MACOSX/`, `.DS_Store` and other dot files are not images: a dot
  name from <split>/ on, or __MACOSX anywhere (folders above <split>/, such as .cache/, may be dot names)."""
  return "__MACOSX" in rel.split("/") or any(part.startswith(".") for part in rel[start:].split("/"))


def _ids(paths: list[str], starts: list[int]) -> list[str]:
  """Unique record ids: each path less the leading folders that every path shares (`cifar10-jpeg/` in
  the shared tar), so `train/cat/1.png` stays that, and `a/train/cat/1.png` and `b/train/cat/1.png` differ."""
  heads = [p[:start].strip("/").split("/") if p[:start].strip("/") else [] for p, start in zip(paths, starts)]
  common = os.path.commonprefix(heads) if heads else []
  return [p[start:] if len(head) == len(common) else "/".join(head[len(common):]) + "/" + p[start:]
          for p, start, head in zip(paths, starts, heads)]


def _walk_folder(root: str):
  for dirpath, _, filenames in tf.io.gfile.walk(root):
    for filename in filenames:
      full = os.path.join(dirpath, filename)
      rel = os.path.relpath(full, root) if "://" not in root else full[len(root.rstrip("/")) + 1:]
      yield rel, lambda full=full: tf.io.gfile.GFile(full, "rb").read()


def _sha256_of_entries(entries) -> str:
  digest = hashlib.sha256()
  for rel, data in entries:
    digest.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
  return digest.hexdigest()


def class_ids(names: set[str]) -> tuple[str, ...]:
  """Class names indexed by label id: CIFAR-10's own ids when every name is a CIFAR-10 name, else the
  names sorted."""
  if names <= set(cifar10.CLASS_NAMES):
    return cifar10.CLASS_NAMES
  return tuple(sorted(names))


def _load_image_files(name: str, kind: str, checksum_fn, entries, image_size=None) -> Source:
  """Reads `<split>/<class>/<image>` entries (path, read function), decodes them in parallel."""
  found, starts = [], []  # (split, class, path inside the source, bytes); where <split>/ starts in the path
  for rel, read in entries:
    match = _IMAGE_PATH.search(rel)
    if match and rel.lower().endswith(IMAGE_EXTENSIONS) and not _hidden(rel, match.start(1)):
      found.append((match.group(1), match.group(2), rel, read()))
      starts.append(match.start(1))
  if not found:
    raise SourceError(f"{name}: no images found under <train|test>/<class_name>/ "
                      f"(extensions {', '.join(IMAGE_EXTENSIONS)})")
  found = [(split, cls, record_id, data) for (split, cls, _, data), record_id
           in zip(found, _ids([e[2] for e in found], starts))]
  found.sort(key=lambda e: e[2])
  images = _decode_all(name, [(e[2], e[3]) for e in found], image_size)
  names = class_ids({e[1] for e in found}) if images.shape[1:] == cifar10.IMAGE_SHAPE else tuple(
      sorted({e[1] for e in found}))  # CIFAR-10's ids only for CIFAR-10-sized images
  splits = {}
  for split in ("train", "test"):
    idx = [i for i, e in enumerate(found) if e[0] == split]
    if idx:
      splits[split] = Split(images[idx], np.array([names.index(found[i][1]) for i in idx], np.int64),
                            [found[i][2] for i in idx])
  return Source(name, kind, checksum_fn([(e[2], e[3]) for e in found]), names, splits)


def _decode(source: str, rel: str, data: bytes) -> np.ndarray:
  # TensorFlow's decoder, the same the `serve_bytes` signature uses, so training and serving see the same
  # pixels from the same file; grey and RGBA images come out RGB.
  try:
    return tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
  except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
    raise SourceError(f"{source}: {rel}: not a decodable image ({e.message.splitlines()[0]})") from None


def _decode_all(source: str, files: list[tuple[str, bytes]], image_size=None) -> np.ndarray:
  """Every file decoded, fitted to `image_size` (height, width) when given; else all must be of the size
  most of them have, and the first of another size is named."""
  with concurrent.futures.ThreadPoolExecutor(cpus.usable().count) as pool:
    images = list(pool.map(lambda f: _decode(source, *f), files))
  if image_size:
    fit = tf.function(lambda image: ops.fit_image(image, *image_size), reduce_retracing=True)
    return np.stack([fit(image).numpy() for image in images])
  shapes = [image.shape for image in images]
  common = max(set(shapes), key=lambda s: (shapes.count(s), -shapes.index(s)))
  for (rel, _), shape in zip(files, shapes):
    if shape != common:
      raise SourceError(f"{source}: {rel}: image is {'x'.join(map(str, shape))}, expected "
                        f"{'x'.join(map(str, common))}")  # the size of most; --image_size fits all to one
  return np.stack(images)


# --- synthetic ----------------------------------------------------------------------------------------------

def make_synthetic(seed: int, num_train: int, num_test: int) -> Source:
  """Learnable fake data: each class has its own colour and stripe direction, under heavy noise."""
  rng = np.random.default_rng(seed)
  colours = rng.uniform(40, 215, size=(cifar10.NUM_CLASSES, 3))
  yy, xx = np.mgrid[0:32, 0:32]
  angles = np.linspace(0, np.pi, cifar10.NUM_CLASSES, endpoint=False)
  stripes = np.stack([np.sin((np.cos(a) * xx + np.sin(a) * yy) * 0.8) for a in angles])  # [10, 32, 32]

  def split(name, n):
    labels = rng.integers(0, cifar10.NUM_CLASSES, n)
    images = colours[labels][:, None, None, :] + 40 * stripes[labels][..., None]
    images = images + rng.normal(0, 30, images.shape)
    return Split(np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int64),
                 [f"{name}_{i:05d}" for i in range(n)])

  splits = {"train": split("train", num_train), "test": split("test", num_test)}
  return Source("synthetic", "synthetic", f"synthetic:seed={seed}:train={num_train}:test={num_test}",
                cifar10.CLASS_NAMES, splits)
