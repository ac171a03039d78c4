"""Input pipeline for HourNAS search and retraining (see input_pipeline.py)."""

# TensorFlow (tf.data for TFDS and image folders) prints C++ start-up lines when first imported.
# Every TF-importing module of this package is imported after this line, so runs that do not
# come through main.py (tools, notebooks, library use) are quiet too (hournas_jax/tf_env.py).
from hournas_jax import tf_env
tf_env.quiet()

# pylint: disable=g-import-not-at-top,wrong-import-position
from hournas_jax.data.common import allowed_channels
from hournas_jax.data.common import check_config
from hournas_jax.data.common import check_dataset
from hournas_jax.data.common import DataError
from hournas_jax.data.common import DataOptions
from hournas_jax.data.common import DATASETS
from hournas_jax.data.common import FOLDER
from hournas_jax.data.common import OFFLINE_DATASETS
from hournas_jax.data.common import options_from_config
from hournas_jax.data.common import SPLITS
from hournas_jax.data.input_pipeline import dataset_info
from hournas_jax.data.input_pipeline import make_batches
from hournas_jax.data.input_pipeline import prefetch_to_mesh
from hournas_jax.data.input_pipeline import steps_per_epoch

__all__ = [
    'DATASETS',
    'DataError',
    'DataOptions',
    'FOLDER',
    'OFFLINE_DATASETS',
    'SPLITS',
    'allowed_channels',
    'check_config',
    'check_dataset',
    'dataset_info',
    'make_batches',
    'options_from_config',
    'prefetch_to_mesh',
    'steps_per_epoch',
]
