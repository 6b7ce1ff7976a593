"""The custom training loop under tf.distribute, checkpoints, summaries and export."""

import os

# Keep TensorFlow's C++ INFO/WARNING lines out of the training log and the tools' output (every tool
# imports `trainer` first).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import sys  # pylint: disable=wrong-import-position

from trainer import cpu  # pylint: disable=wrong-import-position

# TensorFlow turns oneDNN on by default only on CPUs with the instructions in cpu.ONEDNN_FLAGS; on other
# x86 CPUs with AVX2, deep.py's float32 step ran 1.05-1.22x faster with it on (paired runs on a Zen 3,
# docs/results.md, 2026-12-06), so the trainer turns it on there. Read at TensorFlow's import, so it holds
# where `trainer` is imported first (every entry point, and tools/); a user's own setting wins.
if "tensorflow" not in sys.modules and cpu.onednn_pays():
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

# Where TensorFlow runs without oneDNN (TF_ENABLE_ONEDNN_OPTS=0, CPUs without AVX2, or TensorFlow imported
# first on a CPU without the instructions in cpu.ONEDNN_FLAGS), its CPU allocator is malloc, which maps each
# large tensor afresh and page-faults it in every step; its BFC allocator keeps freed memory for the next
# step (docs/results.md, 2026-12-06). With oneDNN its own allocator already pools large tensors. Read when TensorFlow makes its first device, so it holds wherever
# `trainer` is imported before that; a user's own setting wins. Decided without importing TensorFlow, so
# that the trainer still refuses a bad flag before TensorFlow's import (main.py).
if not cpu.onednn_enabled():
  os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
