"""The custom training loop under tf.distribute, checkpoints, summaries and export."""

import os

# As in tools/__init__.py: keep TensorFlow's C++ INFO/WARNING lines out of the training log.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow's BFC allocator for host memory, which keeps what a step freed for the next, instead of malloc,
# which maps each large tensor afresh and page-faults it in every step (docs/results.md, 2026-12-06). Read
# when TensorFlow makes its first tensor, so it holds wherever `trainer` is imported before that.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")
