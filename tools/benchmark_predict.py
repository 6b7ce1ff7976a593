r"""Does tools.predict stream? Runs `python -m tools.predict` on 1 file and on --files files (PNGs of 32x32
noise) and measures, for each run: the child's own max RSS (os.wait4), the time to its first output line,
when it read the last file (that file's access time, set to 1970 before the run: the kernel stamps it at
the read), the total time and the files/s between the first line and the last; and checks that the lines
come in the order of the files.

  python -m tools.benchmark_predict                      # an export made here: mlp:smoke on synthetic data
  python -m tools.benchmark_predict --model=/tmp/run/export --files=10000

Checks (the streaming issue's acceptance; a failed one exits 1): max RSS on --files files within
--max_rss_difference_mb of one file's, the output in input order, and the first line printed before the
last file was read. The last line is `max RSS difference: N MB`. Figures: docs/results.md.
"""

import dataclasses
import os
import random
import struct
import subprocess
import sys
import tempfile
import time
import zlib

from absl import app
from absl import flags

FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SIZE = 32  # pixels a side of the noise images; CIFAR's, so predict resizes nothing for such a model
_CHILD_ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
_UNREAD = 1_000_000_000  # the access time (ns, 1970) given to the last file before a run


def define_flags():
  """Command-line flags; defined only when run as a program, so modules import side by side."""
  flags.DEFINE_string("model", None, "Export directory or .tflite / .onnx file; by default an export of "
                      "configs/mlp.py:smoke trained here on synthetic data (~20 s).")
  flags.DEFINE_integer("files", 10000, "Images in the large run (given on predict's command line).", lower_bound=2)
  flags.DEFINE_integer("batch_size", 0, "predict's --batch_size; 0: its default.", lower_bound=0)
  flags.DEFINE_integer("max_rss_difference_mb", 300, "The bound the large run's max RSS may exceed the "
                       "1-file run's by.", lower_bound=0)


@dataclasses.dataclass
class Run:
  """One `tools.predict` run: seconds from its start, and its output."""
  max_rss_mb: float
  first_line_secs: float
  last_line_secs: float
  last_read_secs: float | None  # None: the file system does not record reads (noatime)
  total_secs: float
  printed: list[str]  # the file column of each output line


def _command(*args) -> None:
  result = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=_CHILD_ENV, capture_output=True,
                          text=True, check=False)
  if result.returncode:
    raise RuntimeError(f"{args[0]} failed:\n{result.stderr[-3000:]}")


def make_export(workdir: str) -> str:
  """An export of configs/mlp.py:smoke trained on a small synthetic dataset, the way a user makes one."""
  data, run = os.path.join(workdir, "data"), os.path.join(workdir, "run")
  _command("tools.make_tfrecords", "--source=synthetic", f"--output_dir={data}", "--synthetic_train_size=512",
           "--synthetic_test_size=64", "--val_size=64", "--num_shards=1")
  _command("trainer.main", "--config=configs/mlp.py:smoke", f"--workdir={run}", f"--config.data_dir={data}")
  return os.path.join(run, "export")


def png(pixels: bytes, width: int, height: int) -> bytes:
  """An 8-bit RGB PNG of `pixels` (rows of width * 3 bytes), written with zlib alone."""
  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
  stride = width * 3
  rows = b"".join(b"\0" + pixels[y * stride:(y + 1) * stride] for y in range(height))  # filter byte 0: none
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) +
          chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def write_images(folder: str, count: int, seed: int = 0) -> list[str]:
  """`count` PNGs of IMAGE_SIZE x IMAGE_SIZE noise in `folder`; their paths."""
  rng = random.Random(seed)
  os.makedirs(folder, exist_ok=True)
  paths = []
  for i in range(count):
    paths.append(os.path.join(folder, f"{i:06d}.png"))
    with open(paths[-1], "wb") as f:
      f.write(png(rng.randbytes(IMAGE_SIZE * IMAGE_SIZE * 3), IMAGE_SIZE, IMAGE_SIZE))
  return paths


def run_predict(model: str, paths: list[str], batch_size: int, log: str) -> Run:
  """Runs tools.predict on `paths`, timing its output lines as they come."""
  last = paths[-1]
  os.utime(last, ns=(_UNREAD, os.stat(last).st_mtime_ns))  # older than its mtime: a read re-stamps it
  args = [f"--model={model}"] + ([f"--batch_size={batch_size}"] if batch_size else [])
  start = time.time()
  with open(log, "w") as stderr:
    child = subprocess.Popen([sys.executable, "-m", "tools.predict", *args, *paths], cwd=ROOT, env=_CHILD_ENV,
                             stdout=subprocess.PIPE, stderr=stderr, text=True)
    printed, first_line = [], None
    for line in child.stdout:
      first_line = first_line or time.time()
      printed.append(line.split("\t")[0])
    last_line = time.time()
    _, status, usage = os.wait4(child.pid, 0)  # the child's own rusage, not all children's so far
    child.returncode = os.waitstatus_to_exitcode(status)
  end = time.time()
  if child.returncode:
    with open(log) as f:
      raise RuntimeError(f"tools.predict exited {child.returncode}:\n{f.read()[-3000:]}")
  read = os.stat(last).st_atime_ns
  return Run(max_rss_mb=usage.ru_maxrss / 1024, first_line_secs=(first_line or end) - start,
             last_line_secs=last_line - start, last_read_secs=None if read == _UNREAD else read / 1e9 - start,
             total_secs=end - start, printed=printed)


def cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return "unknown CPU"


def report(one: Run, many: Run, paths: list[str]) -> list[tuple[str, bool]]:
  """Prints the figures of the runs on `paths[:1]` and on `paths`; returns the checks as (what, passed)."""
  files = len(paths)
  print(f"{'run':<14}{'max RSS MB':>12}{'first line s':>14}{'last file read s':>18}{'total s':>10}{'files/s':>10}")
  for name, run, count in (("1 file", one, 1), (f"{files:,} files", many, files)):
    read = f"{run.last_read_secs:.2f}" if run.last_read_secs is not None else "-"
    rate = f"{(count - 1) / (run.last_line_secs - run.first_line_secs):,.0f}" if count > 1 else "-"
    print(f"{name:<14}{run.max_rss_mb:>12,.0f}{run.first_line_secs:>14.2f}{read:>18}{run.total_secs:>10.2f}"
          f"{rate:>10}")
  print("files/s: from the first line to the last, after start-up")
  difference = many.max_rss_mb - one.max_rss_mb
  streamed = many.last_read_secs is not None and many.first_line_secs < many.last_read_secs
  return [(f"max RSS within {FLAGS.max_rss_difference_mb} MB of one file's ({difference:+,.0f} MB)",
           difference <= FLAGS.max_rss_difference_mb),
          (f"output in input order ({len(many.printed):,} lines)", one.printed == paths[:1] and many.printed == paths),
          ("first line printed before the last file was read" + ("" if many.last_read_secs is not None else
                                                                 " (not measurable: no access times here)"),
           streamed)]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  with tempfile.TemporaryDirectory(prefix="benchmark_predict-") as workdir:
    model = FLAGS.model or make_export(workdir)
    paths = write_images(os.path.join(workdir, "images"), FLAGS.files)
    print(f"{cpu_name()}, {os.cpu_count()} CPUs; model {model if FLAGS.model else 'mlp:smoke (made here)'}; "
          f"{FLAGS.files:,} PNGs of {IMAGE_SIZE}x{IMAGE_SIZE} noise; predict --batch_size "
          f"{FLAGS.batch_size or 'default'}")
    log = os.path.join(workdir, "predict.log")
    one = run_predict(model, paths[:1], FLAGS.batch_size, log)
    many = run_predict(model, paths, FLAGS.batch_size, log)
    checks = report(one, many, paths)
  for what, passed in checks:
    print(f"{'OK' if passed else 'FAIL'}  {what}")
  print(f"max RSS difference: {many.max_rss_mb - one.max_rss_mb:.0f} MB")
  if not all(passed for _, passed in checks):
    sys.exit(1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
