"""A domain-incremental image-folder sequence made from CIFAR-10, for ``--dataset folder:PATH``.

Every period holds all ten classes, but the *look* of the images drifts from period to
period, the way a camera, a compression setting or a colour grade changes in a real stream:

| period | domain | what changes |
|---|---|---|
| p01 | clean | CIFAR-10 as it is |
| p02 | dim | brightness and contrast 0.6 (an underexposed, flat capture) |
| p03 | gray | no colour |
| p04 | blur | Gaussian blur, radius 1 px |
| p05 | jpeg | JPEG quality 8 (heavy block artefacts) |

Each period takes its own ``per_class`` images of every class from CIFAR-10's train split
(disjoint between periods, a seeded permutation), writes them as PNG files to
``OUT/<period>/<class>/<index>/<index>.png``, the layout ``cssl ingest`` and
``cssl bench continual --dataset folder:OUT`` read (the category is the folder below the
period; the eval split is ``ingest.eval_fraction`` of each period, chosen by content hash).
Each image sits in its own folder because ingest takes a frame's ``stream_id`` -- the
bootstrap's unit of independence -- from its folder: CIFAR-10's images are independent, so
each is its own cluster (in ``OUT/<period>/<class>/`` the whole class would be one cluster
and a period's interval would rest on ten units). Size the eval split as docs/benchmarks.md
says: about 1,070 eval images per period for +-0.03 at accuracy 0.5, e.g. ``--per-class 540``
with ``ingest.eval_fraction 0.2``.

``python -m benchmarks.domain_folders --out DIR [--per-class 240] [--seed 0]`` (idempotent:
existing files are rewritten with the same bytes).
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from benchmarks.datasets import load_cifar10, period_names
from cssl_core.data.storage import atomic_path


def _dim(img: Image.Image) -> Image.Image:
    return ImageEnhance.Contrast(ImageEnhance.Brightness(img).enhance(0.6)).enhance(0.6)


def _gray(img: Image.Image) -> Image.Image:
    return img.convert("L").convert("RGB")


def _blur(img: Image.Image) -> Image.Image:
    return img.filter(ImageFilter.GaussianBlur(radius=1.0))


def _jpeg(img: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=8)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


DOMAINS: tuple[tuple[str, Callable[[Image.Image], Image.Image]], ...] = (
    ("clean", lambda img: img),
    ("dim", _dim),
    ("gray", _gray),
    ("blur", _blur),
    ("jpeg", _jpeg),
)
"""The periods' domains, in stream order."""


def write_domain_folders(
    out: str | Path, per_class: int = 240, seed: int = 0, source: str | Path | None = None
) -> list[str]:
    """Write the sequence under ``out`` and return the period names (see the module docs)."""
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    data = load_cifar10(source)
    labels = data.labels["train"]
    rng = np.random.default_rng(seed)
    order = {c: rng.permutation(np.flatnonzero(labels == c)) for c in range(len(data.classes))}
    if min(len(v) for v in order.values()) < per_class * len(DOMAINS):
        raise ValueError(f"CIFAR-10 has too few images per class for {per_class} per period")
    names = period_names(len(DOMAINS))
    for k, (period, (_, transform)) in enumerate(zip(names, DOMAINS, strict=True)):
        for c, name in enumerate(data.classes):
            for index in order[c][k * per_class : (k + 1) * per_class]:
                stem = f"{int(index):05d}"
                folder = Path(out) / period / name / stem
                folder.mkdir(parents=True, exist_ok=True)
                img = Image.open(io.BytesIO(data.image("train", int(index)))).convert("RGB")
                with atomic_path(folder / f"{stem}.png") as tmp:
                    transform(img).save(tmp, format="PNG")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder to write periods into")
    parser.add_argument("--per-class", type=int, default=240, help="images per class per period")
    parser.add_argument("--seed", type=int, default=0, help="seed of the image choice")
    args = parser.parse_args(argv)
    try:
        names = write_domain_folders(args.out, args.per_class, args.seed)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {', '.join(names)} under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
