"""TensorFlow's start-up lines kept out of every run's output.

TensorFlow (tf.data for TFDS and image folders, TFLite for export and latency tables) prints
C++ start-up lines when first imported: CPU feature notices, absl's "before InitializeLog"
warning, and on CPUs where it turns its oneDNN kernels on, an INFO line saying so that
TF_CPP_MIN_LOG_LEVEL does not hide (it is printed before absl's logging starts). `quiet()` sets
both defaults before TF is imported; a user's own values win.
"""

import os


def quiet() -> None:
  """Sets TensorFlow's quiet defaults; call it before anything imports TensorFlow."""
  # Level 2 keeps TF's C++ errors.
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  # Without the oneDNN kernels TF's ops (tf.data's image ops here) also compute the same on
  # every CPU, as the notice they print warns they may not.
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
