"""Safe image decoding with byte and pixel limits, and JPEG encoding.

Every frame that enters a shard is decoded here first. A frame that cannot be decoded gets a
short machine-readable reason (``empty``, ``not_an_image``, ``truncated``, ``corrupt``,
``too_many_bytes``, ``too_many_pixels``) that ends up in the quarantine file.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000

REASONS = ("empty", "not_an_image", "truncated", "corrupt", "too_many_bytes", "too_many_pixels")


class ImageRejected(ValueError):
    """An image failed validation; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class DecodeLimits:
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS


def frame_id(data: bytes) -> str:
    """Content hash of an encoded frame: 32 hex characters of BLAKE2b."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def decode_image(data: bytes | None, limits: DecodeLimits = DecodeLimits()) -> Image.Image:
    """Decode fully to RGB, or raise :class:`ImageRejected` with the reason.

    The pixel limit is checked from the header before any pixel is decoded, so a
    decompression bomb (a tiny PNG declaring 30,000 x 30,000 pixels) costs nothing.
    """
    if not data:
        raise ImageRejected("empty", "zero bytes")
    if len(data) > limits.max_bytes:
        raise ImageRejected("too_many_bytes", f"{len(data)} bytes > {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > limits.max_pixels:
                raise ImageRejected(
                    "too_many_pixels", f"{width}x{height} > {limits.max_pixels} pixels"
                )
            img.load()
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected("too_many_pixels", str(exc)) from None
    except UnidentifiedImageError:
        raise ImageRejected("not_an_image", "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as exc:
        text = str(exc).lower()
        reason = "truncated" if "truncated" in text or "premature" in text else "corrupt"
        raise ImageRejected(reason, str(exc)) from None
    if width <= 0 or height <= 0:
        raise ImageRejected("corrupt", f"size {width}x{height}")
    return img.convert("RGB") if img.mode != "RGB" else img


def encode_jpeg(img: Image.Image | np.ndarray, quality: int = 90) -> bytes:
    """Encode an RGB image (PIL or HxWx3 uint8 array) as baseline JPEG."""
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    if img.mode != "RGB":
        img = img.convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size`` pixels, keeping the aspect ratio."""
    w, h = img.size
    scale = size / min(w, h)
    if scale == 1:
        return img
    return img.resize(
        (max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR
    )


def is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def decode_batch(
    images: list[bytes], size: int, device: torch.device | None = None
) -> torch.Tensor:
    """Decode encoded frames to a uint8 ``(B, 3, size, size)`` tensor.

    Each frame is resized so its shorter side is ``size`` and centre-cropped; frames already
    ``size`` x ``size`` (the simulator's) skip both steps. Decoding uses torchvision's libjpeg
    path for JPEG and falls back to PIL for anything else.

    With a CUDA ``device`` and only JPEG frames, decoding runs on the GPU (nvJPEG through
    ``torchvision.io.decode_jpeg(device=...)``) and the result stays there; when that path is
    unavailable or fails, frames are decoded on the CPU and copied over.
    """
    import torch
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as tv_decode
    from torchvision.transforms.v2 import functional as F

    if device is not None and torch.device(device).type == "cuda" and images:
        decoded = _decode_jpeg_gpu(images, size, torch.device(device))
        if decoded is not None:
            return decoded
        return decode_batch(images, size).to(device)

    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8)
    for i, data in enumerate(images):
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        try:
            img = tv_decode(buf, mode=ImageReadMode.RGB)
        except RuntimeError:
            arr = np.asarray(decode_image(data))
            img = torch.from_numpy(arr.copy()).permute(2, 0, 1)
        if img.shape[-2:] != (size, size):
            img = F.resize(img, size, antialias=True)
            img = F.center_crop(img, [size, size])
        out[i] = img
    return out


def _decode_jpeg_gpu(images: list[bytes], size: int, device: torch.device) -> torch.Tensor | None:
    """nvJPEG batch decode, resized and centre-cropped on the GPU; None when not possible."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import functional as F

    if not all(is_jpeg(data) for data in images):
        return None
    buffers = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in images]
    try:
        decoded = decode_jpeg(buffers, mode=ImageReadMode.RGB, device=device)
    except (RuntimeError, TypeError, ValueError):  # no nvJPEG, or a frame it cannot read
        return None
    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8, device=device)
    for i, img in enumerate(decoded):
        if img.shape[-2:] != (size, size):
            img = F.center_crop(F.resize(img, size, antialias=True), [size, size])
        out[i] = img
    return out
