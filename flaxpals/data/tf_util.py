"""TensorFlow for input pipelines only: imported lazily, never on a GPU.

JAX owns the accelerators. TensorFlow (tf.data, TFDS) would otherwise grab all
GPU memory on its first op, so every flaxpals module that needs TensorFlow gets
it from `import_tf()`, which hides the GPUs from TensorFlow before any op runs.
"""

from __future__ import annotations

import functools
import logging
import os


@functools.cache
def import_tf():
    """Imports TensorFlow with no visible GPU (idempotent); returns the module."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's C++ start-up chatter
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF was initialised elsewhere before us
        if tf.config.get_visible_devices("GPU"):
            logging.getLogger(__name__).warning(
                "TensorFlow was initialised before flaxpals could hide the GPUs from it; "
                "it may hold GPU memory that JAX needs")
    return tf
