"""SimCLR augmentation: per-sample vectorised ops equal torchvision per sample, determinism,
per-sample randomness, ranges, on real CIFAR-10 frames."""

from __future__ import annotations

import dataclasses
import math

import pyarrow.parquet as pq
import pytest
import torch
from torchvision.transforms.v2 import functional as F

from benchmarks.datasets import default_cifar10_source
from cssl_core.config import AugmentConfig
from cssl_core.data.images import decode_batch
from cssl_core.learn.augment import (
    BRIGHTNESS,
    CONTRAST,
    HUE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SATURATION,
    SimCLRAugment,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    apply_view,
    blur_kernel_size,
    color_jitter,
    eval_transform,
    gaussian_blur,
    normalize,
    resized_crops,
    sample_crop_boxes,
    sample_view_params,
    to_grayscale,
)

CIFAR = default_cifar10_source()  # $CSSL_CIFAR10, else ../shared/data beside the repo
MEAN = torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1)


@pytest.fixture(scope="module")
def cifar() -> torch.Tensor:
    """64 real CIFAR-10 test frames as uint8 (64, 3, 32, 32), through decode_batch."""
    batch = next(pq.ParquetFile(CIFAR).iter_batches(batch_size=64, columns=["image"]))
    return decode_batch(batch.column("image").to_pylist(), 32)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _unit(images: torch.Tensor) -> torch.Tensor:
    return F.to_dtype(images, torch.float32, scale=True)


def _normalised(images: torch.Tensor) -> torch.Tensor:
    return F.normalize(_unit(images), list(IMAGENET_MEAN), list(IMAGENET_STD))


# --- the vectorised ops equal torchvision, one sample at a time ---------------------------


def test_color_ops_match_torchvision_per_sample(cifar: torch.Tensor) -> None:
    x = _unit(cifar)
    g = _gen(0)
    factors = torch.rand(len(x), generator=g) * 2.0
    shifts = torch.rand(len(x), generator=g) - 0.5
    shifts[:3] = torch.tensor([-0.5, 0.0, 0.5])
    cases = [
        (adjust_brightness, F.adjust_brightness, factors),
        (adjust_contrast, F.adjust_contrast, factors),
        (adjust_saturation, F.adjust_saturation, factors),
        (adjust_hue, F.adjust_hue, shifts),
    ]
    for ours, theirs, per_sample in cases:
        got = ours(x, per_sample)
        want = torch.stack([theirs(x[i], float(per_sample[i])) for i in range(len(x))])
        assert torch.allclose(got, want, rtol=0, atol=2e-6), ours.__name__


def test_hue_on_grey_and_tied_channels_matches_torchvision() -> None:
    values = torch.tensor([0.0, 0.2, 0.2, 0.7, 1.0])
    x = torch.cartesian_prod(values, values, values).T.reshape(1, 3, 5, 25).repeat(4, 1, 1, 1)
    shifts = torch.tensor([-0.5, -0.1, 0.25, 0.5])
    want = torch.stack([F.adjust_hue(x[i], float(shifts[i])) for i in range(4)])
    assert torch.allclose(adjust_hue(x, shifts), want, rtol=0, atol=2e-6)
    assert torch.allclose(adjust_hue(x, torch.zeros(4)), x, rtol=0, atol=2e-7)


def test_grayscale_and_blur_match_torchvision(cifar: torch.Tensor) -> None:
    x = _unit(cifar[:16])
    assert torch.equal(to_grayscale(x), F.rgb_to_grayscale(x))
    sigma = torch.linspace(0.1, 2.0, 16)
    for k in (3, 7):
        want = torch.stack(
            [F.gaussian_blur(x[i], [k, k], [float(sigma[i])] * 2) for i in range(16)]
        )
        assert torch.allclose(gaussian_blur(x, sigma, k), want, rtol=0, atol=2e-6)


def test_jitter_applies_each_samples_own_order(cifar: torch.Tensor) -> None:
    x = _unit(cifar[:24])
    params = sample_view_params(AugmentConfig(color_jitter_p=0.75), 24, 32, 32, _gen(1))
    assert len({tuple(o.tolist()) for o in params.order}) > 5  # orders really vary
    reference = {
        BRIGHTNESS: (F.adjust_brightness, params.brightness),
        CONTRAST: (F.adjust_contrast, params.contrast),
        SATURATION: (F.adjust_saturation, params.saturation),
        HUE: (F.adjust_hue, params.hue),
    }
    want = x.clone()
    for i in range(24):
        if params.jitter[i]:
            for op in params.order[i].tolist():
                fn, factors = reference[op]
                want[i] = fn(want[i], float(factors[i]))
    got = color_jitter(x, params)
    assert torch.allclose(got, want, rtol=0, atol=1e-5)
    assert torch.equal(got[~params.jitter], x[~params.jitter])


def _bilinear(img: torch.Tensor, y: float, x: float) -> torch.Tensor:
    height, width = img.shape[-2:]
    y, x = min(max(y, 0.0), height - 1.0), min(max(x, 0.0), width - 1.0)
    ya, xa = math.floor(y), math.floor(x)
    yb, xb = min(ya + 1, height - 1), min(xa + 1, width - 1)
    wy, wx = y - ya, x - xa
    return (
        img[:, ya, xa] * (1 - wy) * (1 - wx)
        + img[:, ya, xb] * (1 - wy) * wx
        + img[:, yb, xa] * wy * (1 - wx)
        + img[:, yb, xb] * wy * wx
    )


def _crop_reference(image: torch.Tensor, box: list[float], size: int) -> torch.Tensor:
    """Each output pixel averages n x n bilinear samples spread evenly over its bin, with
    n = ceil(crop side / size) (1 when upsampling: plain bilinear at the bin centre)."""
    x0, y0, x1, y1 = box
    bin_h, bin_w = (y1 - y0) / size, (x1 - x0) / size
    ny, nx = math.ceil(bin_h), math.ceil(bin_w)
    img = image.double()
    out = torch.zeros(image.shape[0], size, size, dtype=torch.float64)
    for i in range(size):
        for j in range(size):
            for sy in range(ny):
                for sx in range(nx):
                    y = y0 + (i + (sy + 0.5) / ny) * bin_h - 0.5
                    x = x0 + (j + (sx + 0.5) / nx) * bin_w - 0.5
                    out[:, i, j] += _bilinear(img, y, x) / (ny * nx)
    return out


def test_resized_crops_are_per_sample_bilinear(cifar: torch.Tensor) -> None:
    x = _unit(cifar[:3])
    # a downscaled full frame (2 x 2 samples per bin), an upscaled crop, a mixed one
    boxes = torch.tensor([[0.0, 0.0, 32.0, 32.0], [3.0, 5.0, 19.0, 17.0], [10.0, 0.0, 31.0, 28.0]])
    got = resized_crops(x, boxes, 24)
    for b in range(3):
        want = _crop_reference(x[b], boxes[b].tolist(), 24).float()
        assert torch.allclose(got[b], want, rtol=0, atol=1e-5), b
    assert torch.equal(resized_crops(x, boxes[:1].repeat(3, 1), 32), x)  # identity crop


# --- crop sampling --------------------------------------------------------------------------


def test_crop_boxes_follow_random_resized_crop() -> None:
    boxes = sample_crop_boxes(4000, 40, 40, (0.2, 1.0), _gen(2))
    x0, y0, x1, y1 = boxes.double().unbind(1)
    w, h = x1 - x0, y1 - y0
    assert torch.equal(boxes, boxes.round())  # integer pixel boxes, as torchvision
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= 40).all() and (y1 <= 40).all()
    area = w * h / 1600
    # w, h are round(sqrt(area * ratio)), round(sqrt(area / ratio)): within 0.5 of the draw
    assert area.min() >= 0.18 and area.max() <= 1.0 and area.mean() > 0.5
    assert ((w - 0.5) / (h + 0.5) <= 4 / 3).all() and ((w + 0.5) / (h - 0.5) >= 3 / 4).all()
    assert len(set(map(tuple, boxes.tolist()))) > 1000


def test_crop_falls_back_to_the_clamped_centre_crop() -> None:
    # Full-area crops of a 32x64 frame never fit for aspect ratios in [3/4, 4/3], so every
    # sample takes torchvision's fallback: height 32, width round(32 * 4/3) = 43, centred.
    boxes = sample_crop_boxes(5, 32, 64, (1.0, 1.0), _gen(3))
    assert torch.equal(boxes, torch.tensor([[10.0, 0.0, 53.0, 32.0]]).repeat(5, 1))


# --- the pipeline ---------------------------------------------------------------------------


def test_views_have_shape_dtype_and_normalised_range(cifar: torch.Tensor) -> None:
    aug = SimCLRAugment(AugmentConfig(blur_p=0.5), size=24)
    v1, v2 = aug(cifar, _gen(4))
    for v in (v1, v2):
        assert v.shape == (64, 3, 24, 24) and v.dtype == torch.float32
        unit = v * STD + MEAN
        assert unit.min() >= -1e-6 and unit.max() <= 1 + 1e-6
    params = sample_view_params(AugmentConfig(blur_p=0.5), 64, 32, 32, _gen(5))
    raw = apply_view(cifar, params, 24)
    assert raw.min() >= 0 and raw.max() <= 1
    assert torch.allclose(normalize(raw), (raw - MEAN) / STD, rtol=0, atol=1e-6)


def test_same_generator_seed_same_views_and_the_stream_moves_on(cifar: torch.Tensor) -> None:
    aug = SimCLRAugment(AugmentConfig(blur_p=0.5), size=32)
    g = _gen(6)
    a1, a2 = aug(cifar, g)
    b1, b2 = aug(cifar, _gen(6))
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    c1, _ = aug(cifar, g)  # same generator, next draws
    assert not torch.equal(a1, c1)
    assert not torch.equal(a1, a2)


def test_parameters_are_drawn_per_sample(cifar: torch.Tensor) -> None:
    same = cifar[:1].repeat(16, 1, 1, 1)
    v1, v2 = SimCLRAugment(AugmentConfig(), size=32)(same, _gen(7))
    rows = {tuple(r.flatten().tolist()) for r in torch.cat([v1, v2])}
    assert len(rows) == 32  # 16 copies of one frame, 32 different views
    params = sample_view_params(AugmentConfig(), 16, 32, 32, _gen(8))
    for field in ("brightness", "contrast", "saturation", "hue", "sigma"):
        assert len(set(getattr(params, field).tolist())) == 16, field
    assert 0 < int(params.flip.sum()) < 16


def test_without_crop_or_colour_each_view_is_the_frame_or_its_mirror(cifar: torch.Tensor) -> None:
    cfg = AugmentConfig(crop_scale_min=1.0, color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    params = sample_view_params(cfg, 64, 32, 32, _gen(9))
    assert torch.equal(params.boxes, torch.tensor([[0.0, 0.0, 32.0, 32.0]]).repeat(64, 1))
    out = apply_view(cifar, params, 32)
    unit = _unit(cifar)
    expected = torch.where(params.flip.reshape(-1, 1, 1, 1), unit.flip(-1), unit)
    assert torch.equal(out, expected)
    unflipped = apply_view(cifar, dataclasses.replace(params, flip=torch.zeros(64, dtype=bool)), 32)
    assert torch.equal(unflipped, unit)


def test_grayscale_and_blur_probabilities_one(cifar: torch.Tensor) -> None:
    cfg = AugmentConfig(crop_scale_min=1.0, color_jitter_p=0.0, grayscale_p=1.0, blur_p=0.0)
    out = apply_view(cifar, sample_view_params(cfg, 64, 32, 32, _gen(10)), 32)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    cfg = AugmentConfig(crop_scale_min=1.0, color_jitter_p=0.0, grayscale_p=0.0, blur_p=1.0)
    params = sample_view_params(cfg, 64, 32, 32, _gen(11))
    blurred = apply_view(cifar, params, 32)
    plain = apply_view(cifar, dataclasses.replace(params, blur=torch.zeros(64, dtype=bool)), 32)
    want = gaussian_blur(plain, params.sigma, blur_kernel_size(32)).clamp(0.0, 1.0)
    assert torch.equal(blurred, want) and not torch.equal(blurred, plain)


def test_eval_transform(cifar: torch.Tensor) -> None:
    out = eval_transform(cifar)
    assert out.dtype == torch.float32 and out.shape == (64, 3, 32, 32)
    assert torch.equal(out, _normalised(cifar))
    assert torch.allclose(out, (cifar.float() / 255.0 - MEAN) / STD, rtol=0, atol=1e-6)
    assert torch.equal(SimCLRAugment(size=32).eval_transform(cifar), out)
    resized = eval_transform(cifar[:, :, :, :24], size=16)  # 32x24 -> shorter side 16, centre
    want = F.center_crop(F.resize(cifar[:, :, :, :24], [16], antialias=True), [16, 16])
    assert torch.equal(resized, _normalised(want))


def test_bad_batches_are_rejected(cifar: torch.Tensor) -> None:
    aug = SimCLRAugment(size=32)
    with pytest.raises(ValueError, match="uint8"):
        aug(cifar.float(), _gen(0))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        eval_transform(cifar[0])


def test_hue_range_is_its_own_setting() -> None:
    def shifts(**kw: float) -> torch.Tensor:
        return sample_view_params(AugmentConfig(**kw), 4096, 32, 32, _gen(12)).hue

    simclr = shifts(hue=0.1)  # SimCLR's s / 4 at s = 0.4
    assert simclr.abs().max() <= 0.1 and simclr.abs().max() > 0.09
    wide = shifts()  # the default: any hue
    assert wide.abs().max() > 0.49 and wide.abs().max() <= 0.5
    assert torch.equal(shifts(hue=0.0), torch.zeros(4096))
    # The hue range does not move the other factors (same draws, same generator state).
    a = sample_view_params(AugmentConfig(hue=0.5), 64, 32, 32, _gen(13))
    b = sample_view_params(AugmentConfig(hue=0.1), 64, 32, 32, _gen(13))
    assert torch.equal(a.brightness, b.brightness) and torch.equal(a.boxes, b.boxes)
