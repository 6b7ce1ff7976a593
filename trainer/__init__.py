"""The custom training loop under tf.distribute, checkpoints, summaries and export."""

import os

# As in tools/__init__.py: keep TensorFlow's C++ INFO/WARNING lines out of the training log.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from trainer import cpu  # pylint: disable=wrong-import-position

# Where TensorFlow runs without oneDNN (CPUs without AVX512_VNNI, AVX512_BF16, AVX_VNNI or AMX), its CPU
# allocator is malloc, which maps each large tensor afresh and page-faults it in every step; its BFC
# allocator keeps freed memory for the next step (docs/results.md, 2026-12-06). With oneDNN its own
# allocator already pools large tensors. Read when TensorFlow makes its first device, so it holds wherever
# `trainer` is imported before that; a user's own setting wins. Decided without importing TensorFlow, so
# that the trainer still refuses a bad flag before TensorFlow's import (main.py).
if not cpu.onednn_enabled():
  os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
