"""HourNAS on the enlarged FBNet space (7x7 kernels added; Table 10: HourNAS-C/D/H), ImageNet.

Targets as HourNAS-C: 4.8M params / 300M FLOPs; HourNAS-D is 5.5M / 400M:
    --config=configs/fbnet_enlarged.py:d
    or  --config.targets.params=5.5e6 --config.targets.flops=400e6
Search and retraining as configs/fbnet.py (FBNet's recipe: SGD, cosine, 360 epochs).
"""

from configs import fbnet as fbnet_lib

VARIANTS = {'c': (4.8e6, 300e6), 'd': (5.5e6, 400e6)}


def get_config(variant: str = 'c'):
  if variant not in VARIANTS:
    raise ValueError(f'unknown fbnet_enlarged variant {variant!r}; choose one of '
                     f'{", ".join(VARIANTS)}')
  config = fbnet_lib.get_config()
  config.space = 'fbnet_enlarged'
  config.targets.params, config.targets.flops = VARIANTS[variant]
  return config
