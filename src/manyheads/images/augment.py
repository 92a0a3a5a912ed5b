"""Augmentation and normalisation of uint8 (or [0, 1] float) batches, on whatever device they are.

Example: ``normalize(Augment(rotate=10)(x, generator))`` with ``x`` a uint8 [B, 3, H, W] batch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_GRAY = (0.299, 0.587, 0.114)
_PADDINGS = ("reflection", "border", "zeros")
_ERASE_FILLS = ("noise", "mean")
_MAX_CROP_AREA = 4.0  # a window 4x the image's area: the face spans half the frame's side
_BLUR_SIGMA = (0.1, 2.0)  # pixels at 128 px, scaled with the image's side
_ERASE_AREA = (0.02, 0.2)  # as torchvision's RandomErasing
_ERASE_RATIO = (0.3, 3.3)


@dataclass(kw_only=True)
class Augment:
    """Per-sample random crop, flip, rotation and colour for a uint8 batch: ``Augment()(x, gen)``.

    The crop picks an area fraction in ``crop_scale`` and an aspect ratio in ``ratio``, shifted
    by up to ``translate`` of the image beyond the border. An area above 1 zooms out: the window
    is larger than the image, so the face shrinks inside the frame (``Augment(crop_scale=(0.6, 1.4),
    padding="border")``). ``padding`` fills what lies outside the image: "reflection" (mirror),
    "border" (edge pixels) or "zeros". ``rotate`` turns by a uniform angle in [-rotate, rotate]
    degrees; crop, flip and rotation are one ``affine_grid`` + ``grid_sample``. Jitter scales
    brightness, contrast and saturation by factors in [1 - jitter, 1 + jitter]. Then, each with its
    own probability per sample: ``grey`` (3 equal luma channels), ``blur`` (Gaussian, sigma in
    [0.1, 2] px at 128 px, scaled with the image) and ``erase`` (one rectangle of 2-20 % of the area,
    aspect 0.3-3.3, filled with uniform noise or the sample's channel means, ``erase_fill``).

    ``crop_scale=None`` and ``rotate=0`` turn the affine step off; with ``flip=False``, ``jitter=0``
    and no grey, blur or erase as well the call is just ``x / 255``. The new options are off by
    default, and while off they draw nothing from the generator. Pass a generator on the batch's
    device for reproducible draws. Returns float (float32 for uint8 input) in [0, 1].
    """

    # Its name from before images/ was a package: runs record it (validation.options_record), and old runs resume.
    __module__ = "manyheads.images"

    crop_scale: tuple[float, float] | None = (0.8, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    translate: float = 0.05
    flip: bool = True
    jitter: float = 0.1
    padding: str = "reflection"
    rotate: float = 0.0
    grey: float = 0.0
    blur: float = 0.0
    erase: float = 0.0
    erase_fill: str = "noise"

    def __post_init__(self) -> None:
        if self.crop_scale is not None and not 0 < self.crop_scale[0] <= self.crop_scale[1] <= _MAX_CROP_AREA:
            raise ValueError(
                f"Augment's crop_scale must satisfy 0 < low <= high <= {_MAX_CROP_AREA:g} (area fractions; "
                f"above 1 zooms out), got {self.crop_scale}"
            )
        if not 0 <= self.jitter < 1:
            raise ValueError(f"Augment's jitter must be in [0, 1), got {self.jitter}")
        if not 0 <= self.rotate <= 180:
            raise ValueError(f"Augment's rotate must be in [0, 180] degrees, got {self.rotate}")
        for name in ("grey", "blur", "erase"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"Augment's {name} must be a probability in [0, 1], got {getattr(self, name)}")
        for name, choices in (("padding", _PADDINGS), ("erase_fill", _ERASE_FILLS)):
            if getattr(self, name) not in choices:
                allowed = ", ".join(map(repr, choices))
                raise ValueError(f"Augment's {name} must be one of {allowed}, got {getattr(self, name)!r}")

    def __call__(self, batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = _to_float(batch)
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected a batch [B, 3, H, W], got shape {tuple(x.shape)}")
        b = x.shape[0]
        u = torch.rand(b, 8, generator=generator, device=x.device, dtype=torch.float32)
        # Drawn only when a newer option is on, so default runs keep their draws (and checkpoints their streams).
        extra = self.rotate > 0 or self.grey > 0 or self.blur > 0 or self.erase > 0
        v = torch.rand(b, 9, generator=generator, device=x.device, dtype=torch.float32) if extra else None
        sign = torch.where(u[:, 4] < 0.5, -1.0, 1.0) if self.flip else torch.ones_like(u[:, 4])
        if self.crop_scale is not None or self.rotate > 0:
            theta = self._theta(u, v, sign, x.shape[-1] / x.shape[-2])
            grid = _affine_grid(theta.to(x.dtype), x.shape[-2], x.shape[-1])
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode=self.padding, align_corners=False)
        elif self.flip:
            x = torch.where((sign < 0).view(b, 1, 1, 1), x.flip(-1), x)
        if x is batch:  # a float batch untouched so far: the steps below work in place, never on the caller's
            x = x.clone()
        if self.jitter > 0:
            x = self._jitter(x, u[:, 5:8])
        if v is not None:
            self._grey_blur_erase(x, v, generator)
        return x.clamp_(0, 1)

    def _theta(self, u: torch.Tensor, v: torch.Tensor | None, sign: torch.Tensor, aspect: float) -> torch.Tensor:
        """[B, 2, 3] maps output to input coordinates: turn, flip, then the crop window and its shift."""
        if self.crop_scale is not None:
            lo, hi = self.crop_scale
            area = lo + (hi - lo) * u[:, 0]
            log_r = math.log(self.ratio[0]) + (math.log(self.ratio[1]) - math.log(self.ratio[0])) * u[:, 1]
            # Normalised coordinates span 2 per image side, so half-width == side fraction. A side is
            # capped at the image's while the area is at most 1; zoomed-out windows may exceed it.
            cap = area.clamp(min=1.0)
            w = torch.minimum((area * log_r.exp()).sqrt(), cap)
            h = torch.minimum((area / log_r.exp()).sqrt(), cap)
            # Zoomed in, the window roams inside the image; zoomed out, the image roams inside it.
            cx = ((1 - w).abs() + 2 * self.translate) * (2 * u[:, 2] - 1)
            cy = ((1 - h).abs() + 2 * self.translate) * (2 * u[:, 3] - 1)
        else:
            w = h = torch.ones_like(sign)
            cx = cy = torch.zeros_like(sign)
        zero = torch.zeros_like(w)
        theta = torch.stack([torch.stack([w * sign, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)
        if v is None or self.rotate == 0:
            return theta
        return _rotate(theta, math.radians(self.rotate) * (2 * v[:, 0] - 1), aspect)

    def _jitter(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Brightness, contrast and saturation factors per sample, in place; each blend is one pass."""
        f = (1 + self.jitter * (2 * u - 1)).to(x.dtype).view(x.shape[0], 3, 1, 1, 1)
        x.mul_(f[:, 0]).clamp_(0, 1)
        # contrast blends with the mean luma: the luma of the channel means, without a luma image
        mean = (x.mean((2, 3)) @ _constant(_GRAY, x.dtype, x.device)).view(-1, 1, 1, 1)
        torch.addcmul(mean * (1 - f[:, 1]), x, f[:, 1], out=x).clamp_(0, 1)
        return torch.addcmul(_luma(x) * (1 - f[:, 2]), x, f[:, 2], out=x)

    def _grey_blur_erase(self, x: torch.Tensor, v: torch.Tensor, generator: torch.Generator | None) -> None:
        """In place, on the samples drawn for each (see :func:`_on_chosen`)."""
        _, _, height, width = x.shape
        if self.grey > 0:
            _on_chosen(x, v[:, 1] < self.grey, lambda chosen, rows: _luma(chosen).expand_as(chosen))
        if self.blur > 0:
            scale = min(height, width) / 128
            sigma = (_BLUR_SIGMA[0] + (_BLUR_SIGMA[1] - _BLUR_SIGMA[0]) * v[:, 3]) * scale
            radius = math.ceil(3 * _BLUR_SIGMA[1] * scale)
            _on_chosen(x, v[:, 2] < self.blur, lambda chosen, rows: _gaussian_blur(chosen, sigma[rows], radius))
        if self.erase > 0:

            def erase(chosen: torch.Tensor, rows: Any) -> torch.Tensor:
                mask = _erase_mask(v[rows, 5:9], height, width).unsqueeze(1)
                if self.erase_fill == "noise":
                    fill = torch.rand(chosen.shape, generator=generator, device=x.device, dtype=torch.float32)
                    fill = fill.to(x.dtype)
                else:
                    fill = chosen.mean((2, 3), keepdim=True).expand_as(chosen)
                return torch.where(mask, fill, chosen)

            _on_chosen(x, v[:, 4] < self.erase, erase)


# Devices where grey, blur and erase work on their chosen samples only. Counting them is a host
# sync, which the CPU does not mind; on an accelerator it would stall the queue in every step, so
# there the whole batch is transformed (cheap on a GPU) and a mask keeps the chosen samples.
_SUBSET_DEVICES = ("cpu",)


def _on_chosen(x: torch.Tensor, flags: torch.Tensor, transform: Callable[[torch.Tensor, Any], torch.Tensor]) -> None:
    """Replace, in place, the samples of ``x`` whose flag is set by ``transform(samples, rows)``.

    ``rows`` indexes per-sample parameters alike on both paths: the chosen rows, or all of them.

        _on_chosen(x, v < 0.1, lambda chosen, rows: chosen.flip(-1))
    """
    if x.device.type not in _SUBSET_DEVICES:
        x.copy_(torch.where(flags.view(-1, 1, 1, 1), transform(x, slice(None)), x))
        return
    rows = flags.nonzero().squeeze(1)
    if len(rows):
        x.index_copy_(0, rows, transform(x.index_select(0, rows), rows))


def _luma(x: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W] luma of an RGB batch (ITU-R 601 weights), as a weighted sum of the 3 channels."""
    r, g, b = _GRAY
    return (x[:, 0:1] * r).add_(x[:, 1:2], alpha=g).add_(x[:, 2:3], alpha=b)


def _affine_grid(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``F.affine_grid(theta, [B, C, height, width], align_corners=False)`` by broadcasting.

    The map is separable per output coordinate: a row term plus a column term, so each of the two
    grid planes is one add of [B, 1, W] and [B, H, 1] instead of the [B, H*W, 3] x [B, 3, 2] product.
    """
    xs = (torch.arange(width, device=theta.device, dtype=theta.dtype) * 2 + 1) / width - 1
    ys = (torch.arange(height, device=theta.device, dtype=theta.dtype) * 2 + 1) / height - 1
    t = theta.unsqueeze(-1).unsqueeze(-1)  # [B, 2, 3, 1, 1]
    along_x = t[:, :, 0] * xs.view(1, 1, 1, width)  # [B, 2, 1, W]
    along_y = t[:, :, 1] * ys.view(1, 1, height, 1) + t[:, :, 2]  # [B, 2, H, 1]
    return (along_x + along_y).permute(0, 2, 3, 1)  # [B, H, W, 2]


def _rotate(theta: torch.Tensor, angle: torch.Tensor, aspect: float) -> torch.Tensor:
    """``theta`` [B, 2, 3] with each sample first turned by its ``angle`` (radians): ``_rotate(theta, a, w / h)``.

    The turn is in pixels, so a non-square image (``aspect`` = width / height) is not sheared.
    """
    cos, sin = angle.cos(), angle.sin()
    turn = torch.stack([torch.stack([cos, -sin / aspect], 1), torch.stack([sin * aspect, cos], 1)], 1)
    return torch.cat([theta[:, :, :2] @ turn.to(theta.dtype), theta[:, :, 2:]], 2)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Blur each sample of ``x`` [B, C, H, W] with its own ``sigma`` [B] (pixels): ``_gaussian_blur(x, s, 6)``.

    Separable, reflection at the edges (as torchvision's gaussian_blur). Each pass sums the 2r + 1
    shifted copies with their weights: on the CPU about twice as fast as a depthwise convolution
    with a kernel per sample, and equal to it up to float rounding.
    """
    height, width = x.shape[-2:]
    radius = max(0, min(radius, height - 1, width - 1))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma.to(x.dtype).view(-1, 1)) ** 2)
    k = (k / k.sum(1, keepdim=True)).view(len(x), 1, 1, 1, -1)  # [B, 1, 1, 1, K]
    for dim, size, pad in ((-1, width, (radius, radius, 0, 0)), (-2, height, (0, 0, radius, radius))):
        padded = F.pad(x, pad, mode="reflect")
        x = padded.narrow(dim, 0, size) * k[..., 0]
        for i in range(1, 2 * radius + 1):
            x.addcmul_(padded.narrow(dim, i, size), k[..., i])
    return x


def _erase_mask(v: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """One rectangle per sample as a bool mask [B, H, W], from 4 uniforms per sample: ``_erase_mask(u, 32, 32)``.

    Area fraction in [0.02, 0.2] and aspect ratio (height / width) in [0.3, 3.3], log-uniform, as
    torchvision's RandomErasing; sides are clipped to the image instead of redrawn.
    """
    area = (_ERASE_AREA[0] + (_ERASE_AREA[1] - _ERASE_AREA[0]) * v[:, 0]) * height * width
    lo, hi = math.log(_ERASE_RATIO[0]), math.log(_ERASE_RATIO[1])
    ratio = (lo + (hi - lo) * v[:, 1]).exp()
    eh = (area * ratio).sqrt().round().clamp(1, height)
    ew = (area / ratio).sqrt().round().clamp(1, width)
    top = (v[:, 2] * (height - eh + 1)).floor()
    left = (v[:, 3] * (width - ew + 1)).floor()
    rows = torch.arange(height, device=v.device, dtype=v.dtype).view(1, -1)
    cols = torch.arange(width, device=v.device, dtype=v.dtype).view(1, -1)
    in_rows = (rows >= top.view(-1, 1)) & (rows < (top + eh).view(-1, 1))
    in_cols = (cols >= left.view(-1, 1)) & (cols < (left + ew).view(-1, 1))
    return in_rows.unsqueeze(2) & in_cols.unsqueeze(1)


def _float_dtype(batch: torch.Tensor) -> torch.dtype:
    """The dtype a batch is worked on in: float32 for uint8, its own for a float batch; TypeError otherwise."""
    if batch.dtype == torch.uint8:
        return torch.float32
    if batch.is_floating_point():
        return batch.dtype
    raise TypeError(f"expected a uint8 or floating batch, got {batch.dtype}")


def _to_float(batch: torch.Tensor) -> torch.Tensor:
    dtype = _float_dtype(batch)
    return batch.to(dtype).div(255) if batch.dtype == torch.uint8 else batch


def normalize(
    batch: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """Channel-normalise a uint8 or [0, 1] float batch: ``normalize(Augment()(x))``."""
    dtype = _float_dtype(batch)
    # One pass: x * (1 / std) - mean / std, with uint8's 1 / 255 folded into the scale.
    to_unit = 1 / 255 if batch.dtype == torch.uint8 else 1.0
    scale = _constant(tuple(to_unit / s for s in std), dtype, batch.device).view(-1, 1, 1)
    shift = _constant(tuple(-m / s for m, s in zip(mean, std, strict=True)), dtype, batch.device).view(-1, 1, 1)
    return torch.addcmul(shift, batch.to(dtype), scale)


@functools.lru_cache(maxsize=32)
def _constant(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Made once per device: building it per batch is a blocking host-to-device copy on CUDA.
    return torch.tensor(values, dtype=dtype, device=device)
