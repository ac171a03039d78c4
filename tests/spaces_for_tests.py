"""A tiny FBNet-like space for tests that train: few layers and ops keep XLA compiles few."""

from hournas_jax import spaces

TOY_TABLE = dict(stem=8, fixed=(), stages=((8, 1, 1), (16, 2, 2), (24, 2, 2)), head=32,
                 ops=('k3e1', 'k3e3', 'skip'), activation='relu', num_classes=10)


def toy_space(resolution=16, num_classes=10, ops=None):
  """5 SuperBlocks: layer1_1 (keeps shape), layer2_1 (vital), layer2_2, layer3_1 (vital),
  layer3_2."""
  return spaces.from_table('toy', TOY_TABLE, resolution, num_classes, 1.0, ops)
