"""HourNAS on the EfficientNet space (Table 14: HourNAS-F), ImageNet.

Targets: EfficientNet-B0's budget, 5.3M params / 390M FLOPs.

Retraining: EfficientNet-B0's TensorFlow recipe, the MnasNet one (configs/mnasnet.py: RMSProp
0.9/0.9/1e-3, 0.016 x batch/256, 5 warmup epochs, x0.97 every 2.4 epochs, 350 epochs, weight
decay 1e-5, label smoothing 0.1, EMA 0.9999) with dropout 0.2. EfficientNet's drop-connect
(stochastic depth 0.2) and AutoAugment are not implemented.
"""

from configs import default as default_lib
from configs import mnasnet as mnasnet_lib


def get_config():
  config = default_lib.get_config()
  config.space = 'efficientnet'
  config.dataset = 'imagenet2012'
  config.targets.params = 5.3e6
  config.targets.flops = 390e6
  mnasnet_lib.set_tf_mobile_recipe(config.train, dropout_rate=0.2)
  return config
