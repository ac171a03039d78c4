"""HourNAS on the MnasNet space (Table 12: HourNAS-E), ImageNet.

Targets: MnasNet-A1's budget, 3.9M params / 312M FLOPs.

Retraining: MnasNet's TensorFlow recipe (tensorflow/tpu models/official/mnasnet):
RMSProp (decay 0.9, momentum 0.9, epsilon 1e-3), learning rate 0.016 x batch/256 with a 5-epoch
linear warmup, then x0.97 every 2.4 epochs (staircase), 350 epochs, weight decay 1e-5, label
smoothing 0.1, EMA of the weights with decay 0.9999 (evaluated), dropout 0.2 before the
classifier. (The TF code trains at batch 4096 on TPUs; the rate scales linearly with the batch.)
"""

from configs import default as default_lib


def set_tf_mobile_recipe(t, *, dropout_rate: float):
  """The MnasNet / EfficientNet retraining recipe, shared by both configs."""
  t.epochs = 350.0
  t.batch_size = 1024
  t.optimizer = 'rmsprop'
  t.learning_rate = 0.016     # per 256 images
  t.lr_scaling = 'linear'
  t.schedule = 'exponential'
  t.warmup_epochs = 5.0
  t.decay_rate = 0.97
  t.decay_epochs = 2.4
  t.momentum = 0.9
  t.rmsprop_decay = 0.9
  t.rmsprop_epsilon = 1e-3
  t.weight_decay = 1e-5
  t.label_smoothing = 0.1
  t.ema_decay = 0.9999
  t.dropout_rate = dropout_rate


def get_config():
  config = default_lib.get_config()
  config.space = 'mnasnet'
  config.dataset = 'imagenet2012'
  config.targets.params = 3.9e6
  config.targets.flops = 312e6
  set_tf_mobile_recipe(config.train, dropout_rate=0.2)
  return config
