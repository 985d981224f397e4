"""SimCLR two-view augmentation, vectorised over a batch with per-sample random parameters.

The pipeline is SimCLR's (Chen et al. 2020, appendix A): random resized crop, horizontal
flip, colour jitter applied with probability ``color_jitter_p`` (brightness, contrast and
saturation strength ``s = color_jitter``, hue rotation up to ``hue`` turns, in a random
order), random grayscale, optional Gaussian blur, then normalisation with the ImageNet mean
and std.

Applying a ``torchvision.transforms.v2`` transform to a batch tensor draws ONE set of random
parameters for the whole batch. Looping over samples fixes that but costs a Python round
trip per image. Here every random parameter is drawn per sample, up front, from the caller's
``torch.Generator`` (:func:`sample_view_params`, on the CPU, so results do not depend on the
device), and then applied to the whole batch at once (:func:`apply_view`):

- crops: one ``torchvision.ops.roi_align`` call with a box per sample (bilinear sampling at
  bin centres; when a crop is larger than the output, ``ceil(crop / size)`` samples per bin
  are averaged, which acts as an antialiasing box filter);
- flips and grayscale: boolean masks and ``torch.where``;
- brightness, contrast, saturation: per-sample factors broadcast over ``(3, H, W)``, with
  the formulas of ``torchvision.transforms.v2.functional`` (so one sample equals torchvision
  on that sample with the same factor);
- hue: a vectorised RGB -> HSV -> RGB round trip with a per-sample hue shift;
- blur: a separable Gaussian with a per-sample sigma as one grouped convolution.

The jitter order is drawn per sample (as torchvision draws it per call); samples are grouped
by the operation at each of the four steps, so every op still runs once per step on its group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as nnf
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as F

from cssl_core.config import AugmentConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
"""Aspect-ratio range of the random resized crop (torchvision's and SimCLR's default)."""
CROP_TRIES = 10
"""Candidate boxes per sample before falling back to a centre crop (as torchvision)."""
BLUR_SIGMA = (0.1, 2.0)
"""SimCLR's Gaussian blur sigma range (in pixels)."""
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
"""Luma weights of ``torchvision``'s ``rgb_to_grayscale`` (ITU-R 601-2)."""

BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


@dataclass(frozen=True)
class ViewParams:
    """Per-sample random parameters of one view; every field has leading dimension ``B``.

    ``boxes``: ``(B, 4)`` float ``x0, y0, x1, y1`` crop box in pixel-edge coordinates
    (the full image is ``0, 0, W, H``). ``flip``, ``jitter``, ``grayscale``, ``blur``:
    ``(B,)`` bool. ``brightness``, ``contrast``, ``saturation``: ``(B,)`` multiplicative
    factors; ``hue``: ``(B,)`` shift in turns, in ``[-0.5, 0.5]``. ``order``: ``(B, 4)``
    permutation of ``BRIGHTNESS, CONTRAST, SATURATION, HUE``. ``sigma``: ``(B,)`` blur sigma.
    """

    boxes: Tensor
    flip: Tensor
    jitter: Tensor
    brightness: Tensor
    contrast: Tensor
    saturation: Tensor
    hue: Tensor
    order: Tensor
    grayscale: Tensor
    blur: Tensor
    sigma: Tensor


def blur_kernel_size(size: int) -> int:
    """SimCLR's blur kernel: about 10% of the image side, odd, at least 3."""
    return max(3, 2 * int(0.05 * size) + 1)


def _uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)


def sample_crop_boxes(
    batch: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    generator: torch.Generator,
    ratio: tuple[float, float] = CROP_RATIO,
) -> Tensor:
    """``RandomResizedCrop``'s box sampler, per sample: ``(B, 4)`` float ``x0, y0, x1, y1``.

    As in torchvision, each sample tries ``CROP_TRIES`` (area fraction, log-uniform aspect)
    candidates and keeps the first whose integer ``w x h`` fits; if none fits it takes the
    centre crop with the aspect ratio clamped to ``ratio``.
    """
    area = float(height * width)
    target_area = area * _uniform((batch, CROP_TRIES), scale[0], scale[1], generator)
    log_ratio = _uniform((batch, CROP_TRIES), math.log(ratio[0]), math.log(ratio[1]), generator)
    aspect = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.int8).argmax(dim=1, keepdim=True)
    any_fit = fits.any(dim=1)
    w = torch.gather(w, 1, first).squeeze(1)
    h = torch.gather(h, 1, first).squeeze(1)
    u_top = torch.rand(batch, generator=generator, dtype=torch.float64)
    u_left = torch.rand(batch, generator=generator, dtype=torch.float64)
    top = torch.floor(u_top * (height - h + 1))
    left = torch.floor(u_left * (width - w + 1))

    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = float(width), float(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fw, fh = float(round(height * ratio[1])), float(height)
    else:
        fw, fh = float(width), float(height)
    ftop, fleft = float((height - fh) // 2), float((width - fw) // 2)
    w = torch.where(any_fit, w, fw)
    h = torch.where(any_fit, h, fh)
    top = torch.where(any_fit, top, ftop)
    left = torch.where(any_fit, left, fleft)
    return torch.stack([left, top, left + w, top + h], dim=1).to(torch.float32)


def sample_view_params(
    cfg: AugmentConfig, batch: int, height: int, width: int, generator: torch.Generator
) -> ViewParams:
    """Draw one view's parameters for ``batch`` images of ``height x width``.

    The number and order of draws from ``generator`` depend only on ``batch``, so the same
    seed gives the same parameters whatever the probabilities are.
    """
    boxes = sample_crop_boxes(batch, height, width, (cfg.crop_scale_min, 1.0), generator)
    s = cfg.color_jitter
    hue_max = cfg.hue

    def coin(p: float) -> Tensor:
        return torch.rand(batch, generator=generator) < p

    def factor() -> Tensor:
        return _uniform((batch,), max(0.0, 1.0 - s), 1.0 + s, generator).to(torch.float32)

    flip = coin(0.5)
    jitter = coin(cfg.color_jitter_p)
    brightness, contrast, saturation = factor(), factor(), factor()
    hue = _uniform((batch,), -hue_max, hue_max, generator).to(torch.float32)
    order = torch.rand((batch, 4), generator=generator).argsort(dim=1)
    grayscale = coin(cfg.grayscale_p)
    blur = coin(cfg.blur_p)
    sigma = _uniform((batch,), *BLUR_SIGMA, generator).to(torch.float32)
    return ViewParams(
        boxes, flip, jitter, brightness, contrast, saturation, hue, order, grayscale, blur, sigma
    )


# --- per-sample image operations on float images in [0, 1], shape (B, 3, H, W) -------------


def resized_crops(images: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Crop ``boxes[b]`` (``x0, y0, x1, y1``, pixel edges) out of ``images[b]`` and resize
    it to ``size x size`` with bilinear sampling at bin centres, all in one ``roi_align``."""
    indices = torch.arange(images.shape[0], device=images.device, dtype=images.dtype)
    rois = torch.cat([indices[:, None], boxes.to(images)], dim=1)
    return roi_align(
        images, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True
    )


def _per_sample(factor: Tensor, like: Tensor) -> Tensor:
    return factor.to(like).reshape(-1, 1, 1, 1)


def to_grayscale(images: Tensor) -> Tensor:
    """Luma ``(B, 1, H, W)`` with torchvision's weights."""
    r, g, b = images.unbind(dim=1)
    luma = (r * GRAY_WEIGHTS[0]).add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2])
    return luma.unsqueeze(1)


def adjust_brightness(images: Tensor, factor: Tensor) -> Tensor:
    """``clamp(f_b * x, 0, 1)`` per sample (``F.adjust_brightness``)."""
    return (images * _per_sample(factor, images)).clamp_(0.0, 1.0)


def _blend(images: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    # f x + (1 - f) o = o + f (x - o)
    return (images - other).mul_(_per_sample(factor, images)).add_(other).clamp_(0.0, 1.0)


def adjust_contrast(images: Tensor, factor: Tensor) -> Tensor:
    """Blend with the image's mean luma, per sample (``F.adjust_contrast``)."""
    mean = to_grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(images, mean, factor)


def adjust_saturation(images: Tensor, factor: Tensor) -> Tensor:
    """Blend with the per-pixel luma, per sample (``F.adjust_saturation``)."""
    return _blend(images, to_grayscale(images), factor)


def adjust_hue(images: Tensor, shift: Tensor) -> Tensor:
    """Rotate the HSV hue by ``shift[b]`` turns, per sample (``F.adjust_hue``).

    A hue rotation keeps ``max = V`` and the chroma ``C = max - min``, so the RGB <-> HSV
    round trip collapses to: hue ``h`` in sextants (``[0, 6)``; ties between channels
    resolve to R, then G, as in torchvision), ``h' = (h + 6 shift) mod 6``, and channel
    ``n`` in ``(R, G, B) = (5, 3, 1)`` is ``max - C clamp(min(k, 4 - k), 0, 1)`` with
    ``k = (n + h') mod 6``. Where ``C = 0`` every hue gives back the grey pixel. Written
    with masks and in-place ops because full-size ``torch.where`` and ``remainder`` are
    several times slower than plain arithmetic on CPU.
    """
    r, g, b = images.unbind(dim=1)
    high = torch.maximum(torch.maximum(r, g), b)
    chroma = torch.minimum(torch.minimum(r, g), b).neg_().add_(high)
    is_r = (high == r).to(images.dtype)
    is_g = (high == g).to(images.dtype).mul_(1.0 - is_r)
    is_b = (1.0 - is_r).sub_(is_g)
    # sextant * C, branch by branch: (g - b), (b - r) + 2C, (r - g) + 4C
    sextant = (g - b).mul_(is_r)
    sextant.addcmul_((b - r).add_(chroma, alpha=2.0), is_g)
    sextant.addcmul_((r - g).add_(chroma, alpha=4.0), is_b)
    sextant.mul_(chroma.clamp_min(1e-12).reciprocal_())
    n = torch.tensor([5.0, 3.0, 1.0], dtype=images.dtype, device=images.device)
    offset = n.reshape(1, 3, 1, 1) + 6.0 * shift.to(images).reshape(-1, 1, 1, 1)
    k = sextant.unsqueeze(1) + offset
    k.sub_(k.mul(1.0 / 6.0).floor_().mul_(6.0))
    ramp = torch.minimum(k, k.neg().add_(4.0)).clamp_(0.0, 1.0)
    return ramp.mul_(chroma.unsqueeze(1)).neg_().add_(high.unsqueeze(1))


def gaussian_blur(images: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Separable Gaussian blur with a per-sample ``sigma`` and reflect padding
    (``F.gaussian_blur``), as one grouped convolution per axis."""
    batch, channels, height, width = images.shape
    half = (kernel_size - 1) / 2.0
    x = torch.linspace(-half, half, kernel_size, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (x[None, :] / sigma.to(images)[:, None]) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    kernel = kernel.repeat_interleave(channels, dim=0)  # (B*C, k)
    pad = kernel_size // 2
    flat = images.reshape(1, batch * channels, height, width)
    flat = nnf.pad(flat, (pad, pad, pad, pad), mode="reflect")
    flat = nnf.conv2d(flat, kernel[:, None, None, :], groups=batch * channels)
    flat = nnf.conv2d(flat, kernel[:, None, :, None], groups=batch * channels)
    return flat.reshape(batch, channels, height, width)


def normalize(images: Tensor) -> Tensor:
    """``(x - mean) / std`` with the ImageNet statistics (``F.normalize``)."""
    return F.normalize(images, list(IMAGENET_MEAN), list(IMAGENET_STD))


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
"""Indexed by ``BRIGHTNESS, CONTRAST, SATURATION, HUE``."""


def color_jitter(images: Tensor, params: ViewParams) -> Tensor:
    """Apply each selected sample's four jitter ops in that sample's own order.

    At each of the four steps the selected samples are grouped by the op they take at that
    step, so each op runs once per step on its group (16 batched calls at most).
    """
    device = images.device
    out = images.clone()
    jitter = params.jitter.to(device)
    order = params.order.to(device)
    factors = torch.stack(
        [params.brightness, params.contrast, params.saturation, params.hue], dim=1
    ).to(device)
    for step in range(4):
        for op, fn in enumerate(_JITTER_OPS):
            idx = torch.nonzero(jitter & (order[:, step] == op)).squeeze(1)
            if idx.numel():
                out[idx] = fn(out[idx], factors[idx, op])
    return out


def apply_view(images: Tensor, params: ViewParams, size: int) -> Tensor:
    """One augmented view: uint8 ``(B, 3, H, W)`` -> float32 ``(B, 3, size, size)`` in
    ``[0, 1]`` (not yet normalised)."""
    x = F.to_dtype(images, torch.float32, scale=True)
    x = resized_crops(x, params.boxes, size).clamp_(0.0, 1.0)
    device = x.device
    mask = params.flip.to(device).reshape(-1, 1, 1, 1)
    x = torch.where(mask, x.flip(-1), x)
    if bool(params.jitter.any()):
        x = color_jitter(x, params)
    gray = params.grayscale.to(device).reshape(-1, 1, 1, 1)
    if bool(params.grayscale.any()):
        x = torch.where(gray, to_grayscale(x).expand_as(x), x)
    if bool(params.blur.any()):
        idx = torch.nonzero(params.blur).squeeze(1).to(device)
        blurred = gaussian_blur(x[idx], params.sigma.to(device)[idx], blur_kernel_size(size))
        x[idx] = blurred.clamp_(0.0, 1.0)  # kernel weights sum to 1 only up to rounding
    return x


def eval_transform(images: Tensor, size: int | None = None) -> Tensor:
    """Deterministic evaluation/serving transform: uint8 ``(B, 3, H, W)`` -> normalised
    float32. With ``size``, frames not already ``size x size`` are resized (shorter side,
    antialiased) and centre-cropped, as ``cssl_core.data.images.decode_batch`` does."""
    _check_batch(images)
    x = images
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.center_crop(F.resize(x, [size], antialias=True), [size, size])
    return normalize(F.to_dtype(x, torch.float32, scale=True))


def _check_batch(images: Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected a (B, 3, H, W) image batch, got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        raise ValueError(
            f"expected uint8 images (from cssl_core.data.images.decode_batch), got {images.dtype}"
        )


class SimCLRAugment:
    """Two SimCLR views of a uint8 batch, with per-sample random parameters.

    ``SimCLRAugment(cfg, size)(images, generator)`` returns two normalised float32
    ``(B, 3, size, size)`` tensors on ``images.device``; the result is a function of the
    images and the generator's state only.
    """

    def __init__(self, cfg: AugmentConfig = AugmentConfig(), size: int = 64) -> None:
        if size < 8:
            raise ValueError(f"augmentation size must be at least 8 pixels, got {size}")
        self.cfg = cfg
        self.size = size

    def sample(self, batch: int, height: int, width: int, generator: torch.Generator) -> ViewParams:
        return sample_view_params(self.cfg, batch, height, width, generator)

    def view(self, images: Tensor, params: ViewParams) -> Tensor:
        """One normalised view for given parameters."""
        _check_batch(images)
        return normalize(apply_view(images, params, self.size))

    def __call__(self, images: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        _check_batch(images)
        batch, _, height, width = images.shape
        first = self.sample(batch, height, width, generator)
        second = self.sample(batch, height, width, generator)
        return self.view(images, first), self.view(images, second)

    def eval_transform(self, images: Tensor) -> Tensor:
        """:func:`eval_transform` at this augmentation's size."""
        return eval_transform(images, self.size)
