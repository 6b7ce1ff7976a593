"""File helpers over tf.io.gfile, so every path may be local or `gs://`."""

import hashlib
import json
import os
import re
import uuid

import tensorflow as tf

_CHUNK = 1 << 22


class StorageError(Exception):
  """A storage location that cannot be used: a missing gs:// bucket, no permission, no credentials."""


def check_bucket(path: str) -> None:
  """For a gs:// path, fails fast and clearly when its bucket does not exist, these credentials may not use
  it, or there are no credentials (TF's own client would otherwise retry writes for minutes, and its
  errors are an HTTP body). Local paths pass."""
  if not path.startswith("gs://"):
    return
  bucket = "gs://" + path[len("gs://"):].split("/")[0]
  if bucket in _USABLE_BUCKETS:
    return
  try:
    found = tf.io.gfile.exists(bucket)
  except tf.errors.OpError as e:
    raise StorageError(f"{path}: {_gcs_refusal(bucket, e.message)}") from None
  if not found:
    raise StorageError(f"{path}: bucket {bucket} does not exist, or these credentials cannot see it")
  _USABLE_BUCKETS.add(bucket)


_USABLE_BUCKETS = set()  # checked once per process


def _gcs_refusal(bucket: str, message: str) -> str:
  """What a failed request to `bucket` means, from TF's error text (which carries GCS's HTTP answer)."""
  code = re.search(r"HTTP response code (\d+)", message)
  detail = re.search(r'"message": "((?:[^"\\]|\\.)*)"', message)
  detail = detail.group(1) if detail else message.splitlines()[0]
  if code and code.group(1) == "401":
    return (f"no Google Cloud credentials were accepted for {bucket} (GCS: {detail}); run `gcloud auth "
            "application-default login` or set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file")
  if code and code.group(1) == "403":
    return f"no permission to use bucket {bucket} with these credentials (GCS: {detail})"
  return f"cannot reach bucket {bucket} ({detail})"


def sha256_file(path: str) -> str:
  digest = hashlib.sha256()
  with tf.io.gfile.GFile(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def temp_name(path: str) -> str:
  """A sibling of `path` that no reader globbing for final names will match."""
  head, tail = os.path.split(path)
  return os.path.join(head, f".tmp-{uuid.uuid4().hex[:8]}-{tail}")


def atomic_write(path: str, data: str | bytes) -> None:
  """Writes `data` to a temporary sibling, then renames it over `path`: readers never see a partial file."""
  tmp = temp_name(path)
  try:
    with tf.io.gfile.GFile(tmp, "wb" if isinstance(data, bytes) else "w") as f:
      f.write(data)
    tf.io.gfile.rename(tmp, path, overwrite=True)
  except BaseException:
    remove_quietly(tmp)  # a full disk must not be made fuller by the half-written file
    raise


def remove_quietly(path: str) -> None:
  """Removes the file or directory tree at `path` if it is there; a failure to (storage out of reach) is
  left for the caller's own error to explain."""
  try:
    if tf.io.gfile.isdir(path):
      tf.io.gfile.rmtree(path)
    elif tf.io.gfile.exists(path):
      tf.io.gfile.remove(path)
  except (tf.errors.OpError, OSError):
    pass


def temporaries(directory: str, patterns: tuple[str, ...] = (".tmp-*",)) -> list[str]:
  """What interrupted writes left in `directory`: the `temp_name`s (and any other `patterns`, relative to
  it), which no reader looks at."""
  return [path for pattern in patterns for path in tf.io.gfile.glob(os.path.join(directory, pattern))]


def write_json(path: str, obj) -> None:
  atomic_write(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str):
  with tf.io.gfile.GFile(path, "r") as f:
    return json.load(f)


def rename_dir(src: str, dst: str, last: str) -> None:
  """Moves directory `src` to `dst` (which must not exist). Locally one atomic rename; on object stores
  (gs://), where a directory rename is a copy per object, file by file with the file named `last` moved
  last, so a reader that waits for `last` never sees a partial directory."""
  if "://" not in src:
    tf.io.gfile.rename(src, dst)
    return
  _each_file(src, dst, tf.io.gfile.rename, last)
  tf.io.gfile.rmtree(src)


def copy_dir(src: str, dst: str) -> None:
  """Copies the directory tree `src` to `dst` (which must not exist), file by file."""
  _each_file(src, dst, tf.io.gfile.copy)


def _each_file(src: str, dst: str, move, last: str | None = None) -> None:
  """`move(src/f, dst/f)` for every file f below `src`, its folders made first; the file named `last` last."""
  files = [os.path.join(root, name)[len(src.rstrip("/")) + 1:]
           for root, _, names in tf.io.gfile.walk(src) for name in names]
  for name in sorted(files, key=lambda f: f == last):
    tf.io.gfile.makedirs(os.path.dirname(os.path.join(dst, name)))
    move(os.path.join(src, name), os.path.join(dst, name))
