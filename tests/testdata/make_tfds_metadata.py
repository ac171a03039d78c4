"""Writes the TFDS metadata that tfds.testing.mock_data needs for our tests.

mock_data fakes the examples but reads split names and sizes from
<data_dir>/<name>/<version>/dataset_info.json; these tiny split sizes keep the
tests fast. Rerun after a TFDS upgrade changes a dataset's version:

  python tests/testdata/make_tfds_metadata.py
"""

import os

import tensorflow_datasets as tfds

SPLIT_SIZES = {
    'imagenet2012': {'train': 20, 'validation': 10},
    'cifar10': {'train': 20, 'test': 10},
}


def main() -> None:
  data_dir = os.path.dirname(os.path.abspath(__file__))
  for name, sizes in SPLIT_SIZES.items():
    builder = tfds.builder(name, data_dir=data_dir)
    template = tfds.core.ShardedFileTemplate(
        data_dir=builder.data_dir, dataset_name=name,
        filetype_suffix='tfrecord')
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name=split, shard_lengths=[count], num_bytes=0,
                            filename_template=template)
        for split, count in sizes.items()
    ]))
    os.makedirs(builder.data_dir, exist_ok=True)
    builder.info.write_to_directory(builder.data_dir)


if __name__ == '__main__':
  main()
