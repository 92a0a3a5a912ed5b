"""Images as uint8 tensors at the training resolution: decode once, augment on the training device.

``decoding`` turns one item into pixels, ``cache`` decodes a column once into a uint8 cache (once
per machine under torchrun), ``augment`` augments and normalises batches on the device.

    x = normalize(Augment()(build_cache(paths, 128).images[:64].to(device)))
"""

from manyheads.images.augment import IMAGENET_MEAN, IMAGENET_STD, Augment, normalize
from manyheads.images.cache import ImageCache, build_cache, ready_cache
from manyheads.images.decoding import (
    IMAGE_SUFFIXES,
    BadImageError,
    decode,
    is_bytes,
    is_image_dict,
    load_rgb,
    looks_like_images,
)

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_SUFFIXES", "Augment", "BadImageError", "ImageCache", "build_cache",
    "decode", "is_bytes", "is_image_dict", "load_rgb", "looks_like_images", "normalize", "ready_cache",
]  # fmt: skip
