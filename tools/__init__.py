"""Command-line tools: make_tfrecords, evaluate, predict, benchmarks.

Each tool module that imports TensorFlow imports `trainer` first, in its own module rather than here: `trainer`
sets TensorFlow's oneDNN and host-allocator choices, which TensorFlow reads at its import, so that a tool
runs the kernels the trainer runs (trainer/__init__.py). This file is not always run: tf2onnx (the
[convert] extra) installs a top-level `tools` folder of its own, and in an editable install Python then
takes `tools` for a namespace package wherever the repository is not the current directory.
"""

__version__ = "0.1.0"
