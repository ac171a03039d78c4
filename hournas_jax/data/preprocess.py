"""TensorFlow image preprocessing: ImageNet, CIFAR-10 and any decoded image.

Follows the flax ImageNet example (also the FBNet recipe HourNAS uses). Other
datasets (TFDS by name, image folders) get the same two recipes, chosen by the
output size: the CIFAR-10 one up to SMALL_IMAGE_SIZE, the ImageNet one above.
All randomness is stateless: each function takes an explicit [2]-int seed, so
an example's augmentation depends only on (run seed, epoch, position) and a
resumed run reproduces it exactly.
"""

import tensorflow as tf

# RGB statistics on the 0-255 scale.
IMAGENET_MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)
CIFAR10_MEAN_RGB = (0.4914 * 255, 0.4822 * 255, 0.4465 * 255)
CIFAR10_STDDEV_RGB = (0.2470 * 255, 0.2435 * 255, 0.2616 * 255)

# Eval center crop keeps image_size / (image_size + CROP_PADDING) of the
# shorter side (224 of 256 for the standard size).
CROP_PADDING = 32
CIFAR10_IMAGE_SIZE = 32
CIFAR10_PADDING = 4

# Largest output size that gets the small-image recipe (whole image, pad and
# crop): random-resized crops of 8% of the area leave too few pixels below it.
SMALL_IMAGE_SIZE = 64
# Gray images are standardized with the mean of ImageNet's channel statistics.
GRAY_MEAN = (sum(IMAGENET_MEAN_RGB) / 3,)
GRAY_STDDEV = (sum(IMAGENET_STDDEV_RGB) / 3,)


def random_crop_window(image_shape: tf.Tensor, seed: tf.Tensor, *,
                       area_range=(0.08, 1.0),
                       aspect_ratio_range=(3 / 4, 4 / 3),
                       max_attempts: int = 10) -> tf.Tensor:
  """Samples an Inception-style crop [offset_y, offset_x, height, width].

  If no window fits after max_attempts, TF returns the whole image.
  """
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      image_shape,
      bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
      seed=seed,
      min_object_covered=0.1,
      aspect_ratio_range=aspect_ratio_range,
      area_range=area_range,
      max_attempts=max_attempts,
      use_image_if_no_bounding_boxes=True)
  return tf.stack([begin[0], begin[1], size[0], size[1]])


def center_crop_window(image_shape: tf.Tensor, image_size: int) -> tf.Tensor:
  """The centered square [offset_y, offset_x, size, size] used for eval."""
  height, width = image_shape[0], image_shape[1]
  crop_size = tf.cast(
      (image_size / (image_size + CROP_PADDING)) *
      tf.cast(tf.minimum(height, width), tf.float32), tf.int32)
  offset_y = ((height - crop_size) + 1) // 2
  offset_x = ((width - crop_size) + 1) // 2
  return tf.stack([offset_y, offset_x, crop_size, crop_size])


def resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
  """Bicubic resize to a square float32 image, as the flax example does."""
  return tf.image.resize(image, [image_size, image_size],
                         method=tf.image.ResizeMethod.BICUBIC)


def train_crop_window(image_shape: tf.Tensor, seed: tf.Tensor,
                      image_size: int) -> tf.Tensor:
  """The random-resized-crop window, or the eval window if sampling fails."""
  window = random_crop_window(image_shape, seed)
  # A whole-image window means sampling failed; the recipe falls back to the
  # eval center crop rather than training on the uncropped image.
  sampling_failed = tf.reduce_all(tf.equal(window[2:], image_shape[:2]))
  return tf.cond(sampling_failed,
                 lambda: center_crop_window(image_shape, image_size),
                 lambda: window)


def decode_and_random_resized_crop(image_bytes: tf.Tensor, seed: tf.Tensor,
                                   image_size: int) -> tf.Tensor:
  """Random-resized crop of a JPEG, decoding only the cropped window."""
  shape = tf.image.extract_jpeg_shape(image_bytes)
  window = train_crop_window(shape, seed, image_size)
  image = tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)
  return resize(image, image_size)


def decode_and_center_crop(image_bytes: tf.Tensor,
                           image_size: int) -> tf.Tensor:
  """Eval crop of a JPEG, decoding only the cropped window."""
  shape = tf.image.extract_jpeg_shape(image_bytes)
  image = tf.image.decode_and_crop_jpeg(
      image_bytes, center_crop_window(shape, image_size), channels=3)
  return resize(image, image_size)


def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Mirrors left-right with probability 1/2."""
  return tf.image.stateless_random_flip_left_right(image, seed)


def pad_and_random_crop(image: tf.Tensor, seed: tf.Tensor,
                        padding: int = CIFAR10_PADDING) -> tf.Tensor:
  """Zero-pads each side by `padding` px and crops back to the input size."""
  padded = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
  return tf.image.stateless_random_crop(padded, tf.shape(image), seed)


def normalize(image: tf.Tensor, mean_rgb, stddev_rgb) -> tf.Tensor:
  """Per-channel standardization of a 0-255 RGB image to float32."""
  image = tf.cast(image, tf.float32)
  return (image - tf.constant(mean_rgb)) / tf.constant(stddev_rgb)


def preprocess_imagenet(image_bytes: tf.Tensor, seed: tf.Tensor | None, *,
                        image_size: int, train: bool) -> tf.Tensor:
  """Encoded JPEG to a normalized float32 image; seed is unused for eval."""
  if train:
    crop_seed, flip_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, num=2))
    image = decode_and_random_resized_crop(image_bytes, crop_seed, image_size)
    image = random_flip(image, flip_seed)
  else:
    image = decode_and_center_crop(image_bytes, image_size)
  return normalize(image, IMAGENET_MEAN_RGB, IMAGENET_STDDEV_RGB)


def preprocess_cifar10(image_bytes: tf.Tensor, seed: tf.Tensor | None, *,
                       image_size: int, train: bool) -> tf.Tensor:
  """Encoded PNG to a normalized float32 image; seed is unused for eval."""
  # Every CIFAR-10 image is 32x32; saying so gives the pipeline static shapes.
  image = tf.ensure_shape(
      tf.io.decode_png(image_bytes, channels=3),
      [CIFAR10_IMAGE_SIZE, CIFAR10_IMAGE_SIZE, 3])
  if train:
    crop_seed, flip_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, num=2))
    image = pad_and_random_crop(image, crop_seed)
    image = random_flip(image, flip_seed)
  image = normalize(image, CIFAR10_MEAN_RGB, CIFAR10_STDDEV_RGB)
  if image_size != CIFAR10_IMAGE_SIZE:
    image = resize(image, image_size)
  return image


def decode_image(image_bytes: tf.Tensor, channels: int) -> tf.Tensor:
  """A JPEG or PNG as uint8 [H, W, channels]; gray and RGB convert either way."""
  image = tf.io.decode_image(image_bytes, channels=channels,
                             expand_animations=False)
  # decode_image leaves the rank unknown; every later op needs it.
  return tf.ensure_shape(image, [None, None, channels])


def crop(image: tf.Tensor, window: tf.Tensor) -> tf.Tensor:
  """image[y:y + h, x:x + w] for a window [y, x, h, w]."""
  return image[window[0]:window[0] + window[2], window[1]:window[1] + window[3]]


def square_center_crop(image: tf.Tensor) -> tf.Tensor:
  """The largest centered square: the whole image when it is square."""
  shape = tf.shape(image)
  size = tf.minimum(shape[0], shape[1])
  return crop(image, tf.stack([(shape[0] - size) // 2,
                               (shape[1] - size) // 2, size, size]))


def preprocess_image(image: tf.Tensor, seed: tf.Tensor | None, *,
                     image_size: int, train: bool,
                     random_flip_on: bool = True,
                     mean=None, stddev=None) -> tf.Tensor:
  """A decoded uint8 image of any size, 1 or 3 channels, to a normalized square.

  Up to SMALL_IMAGE_SIZE the whole (center-square) image is shrunk to
  image_size and, in training, padded by image_size / 8 and randomly cropped
  back (CIFAR-10's recipe at 32 px). Above it training takes ImageNet's
  random-resized crop and eval its center crop. Training images are then
  mirrored with probability 1/2 unless random_flip_on is False. seed is unused
  for eval. mean and stddev (per channel, 0-255 scale) standardize the result;
  None: ImageNet's (their channel average for gray images).
  """
  channels = image.shape[-1]
  if train:
    crop_seed, flip_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, num=2))
  if image_size <= SMALL_IMAGE_SIZE:
    # Antialiasing: images can be many times larger than the output.
    image = tf.image.resize(square_center_crop(image), [image_size, image_size],
                            method=tf.image.ResizeMethod.BILINEAR,
                            antialias=True)
    if train:
      image = pad_and_random_crop(image, crop_seed,
                                  padding=max(1, image_size // 8))
  else:
    shape = tf.shape(image)
    window = (train_crop_window(shape, crop_seed, image_size) if train
              else center_crop_window(shape, image_size))
    image = resize(crop(image, window), image_size)
  if train and random_flip_on:
    image = random_flip(image, flip_seed)
  image = tf.ensure_shape(image, [image_size, image_size, channels])
  if mean is not None:
    return normalize(image, tuple(mean), tuple(stddev))
  if channels == 1:
    return normalize(image, GRAY_MEAN, GRAY_STDDEV)
  return normalize(image, IMAGENET_MEAN_RGB, IMAGENET_STDDEV_RGB)
