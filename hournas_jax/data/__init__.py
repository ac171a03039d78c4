"""Input pipeline for HourNAS search and retraining (see input_pipeline.py)."""

from hournas_jax.data.common import DATASETS
from hournas_jax.data.common import DataError
from hournas_jax.data.common import OFFLINE_DATASETS
from hournas_jax.data.common import SPLITS
from hournas_jax.data.input_pipeline import dataset_info
from hournas_jax.data.input_pipeline import make_batches
from hournas_jax.data.input_pipeline import prefetch_to_mesh
from hournas_jax.data.input_pipeline import steps_per_epoch

__all__ = [
    'DATASETS',
    'DataError',
    'OFFLINE_DATASETS',
    'SPLITS',
    'dataset_info',
    'make_batches',
    'prefetch_to_mesh',
    'steps_per_epoch',
]
