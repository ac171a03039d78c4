"""The sweep over the number of space proposals m (Table 1): m = 1, 2, 4, 8 or 16.

"We set the computational resources the same as FBNet-B and search architectures using m
different space proposals": the search of configs/fbnet.py (FBNet space, ImageNet, 4.8M params /
300M FLOPs) with m proposals. The paper then evaluates each searched architecture on CIFAR-10
(Table 1), not ImageNet, so this config stops after the search:
    python main.py --config=configs/ablations/num_proposals.py:4 --workdir=/tmp/m4
    python main.py --config=configs/cifar10.py --workdir=/tmp/m4_cifar10 --config.mode=train \\
        --config.train.arch=/tmp/m4/arch.json
(m = 8 is the default, as in the paper's other experiments.)
"""

from configs import fbnet as fbnet_lib

VARIANTS = ('1', '2', '4', '8', '16')


def get_config(variant: str = '8'):
  if variant not in VARIANTS:
    raise ValueError(f'unknown num_proposals variant {variant!r}; choose one of '
                     f'{", ".join(VARIANTS)}')
  config = fbnet_lib.get_config('a')
  ablate(config.search, int(variant))
  config.retrain_after_search = False
  return config


def ablate(s, m: int = 1):
  """Sets the number of space proposals of the search config `s` (config.search) to m."""
  s.num_proposals = m
