"""A procedurally generated 10-class 16x16 RGB "shapes" set for the `arrays` source, harder than digits.

Classes (all mirror-invariant, so the source's crop + flip augmentation keeps labels): filled disc, ring, filled
square, square outline, triangle (apex up), plus, X, horizontal stripes, vertical stripes, checkerboard. Each image
draws a random centre (the shape may run off the edge), scale (3..7 px half-size), stroke width, foreground and
background colour (channel contrast at least `contrast` on [0, 1]), and adds Gaussian pixel noise (std `noise`) and
optionally a soft blob of a third colour (`distractor`: its opacity). Deterministic in its arguments.

The recorded task (record.py SHAPES: 2400 train / 800 val, noise 0.06, contrast 0.35, no distractor; 15 epochs,
batch 64) was calibrated by hand: the digits_cnn_large teacher reaches 97.0 % val after 30 epochs; the
digits_cnn_small student 77-84 % with the ACKD reference point and 25-65 % with most random configurations, with a
large seed-to-seed spread (the 5k-parameter student is far from converged in 560 SGD steps: a hard, noisy regime,
unlike digits). A first try (noise 0.12, contrast 0.25, distractor 0.6, 2000 images) left the student at 20-46 %
(teacher 87 %); 3000 images at 15 epochs gave 83 % for both KD and the reference but cost twice as much per run."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CLASSES = ("disc", "ring", "square", "square_outline", "triangle", "plus", "x", "hstripes", "vstripes", "checker")
SIDE = 16


def _mask(kind: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32) + 0.5
    r = rng.uniform(3.0, 7.0)
    cy, cx = rng.uniform(r * 0.6, SIDE - r * 0.6, size=2)
    dy, dx = yy - cy, xx - cx
    w = rng.uniform(1.0, 2.0)  # stroke width
    dist = np.sqrt(dy ** 2 + dx ** 2)
    inside_box = (np.abs(dy) <= r) & (np.abs(dx) <= r)
    name = CLASSES[kind]
    if name == "disc":
        return dist <= r
    if name == "ring":
        return np.abs(dist - r + w / 2) <= w / 2
    if name == "square":
        return inside_box
    if name == "square_outline":
        return inside_box & ~((np.abs(dy) <= r - w) & (np.abs(dx) <= r - w))
    if name == "triangle":
        return (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)
    if name == "plus":
        return inside_box & ((np.abs(dy) <= w / 2 + 0.25) | (np.abs(dx) <= w / 2 + 0.25))
    if name == "x":
        return inside_box & ((np.abs(dy - dx) <= w * 0.75) | (np.abs(dy + dx) <= w * 0.75))
    period = rng.integers(2, 5)
    phase = rng.integers(0, period * 2)
    if name == "hstripes":
        return inside_box & (((yy.astype(int) + phase) // period) % 2 == 0)
    if name == "vstripes":
        return inside_box & (((xx.astype(int) + phase) // period) % 2 == 0)
    return inside_box & ((((yy.astype(int) + phase) // period) + ((xx.astype(int) + phase) // period)) % 2 == 0)


def _image(kind: int, rng: np.random.Generator, noise: float, contrast: float, distractor: float) -> np.ndarray:
    while True:
        fg, bg = rng.uniform(0, 1, size=(2, 3))
        if np.abs(fg - bg).max() >= contrast:
            break
    img = np.broadcast_to(bg, (SIDE, SIDE, 3)).copy()
    blob = rng.uniform(0, SIDE, size=2)  # a distractor: a small soft blob of a third colour
    yy, xx = np.mgrid[0:SIDE, 0:SIDE] + 0.5
    weight = np.exp(-((yy - blob[0]) ** 2 + (xx - blob[1]) ** 2) / (2 * rng.uniform(0.8, 2.0) ** 2))
    img = img * (1 - distractor * weight[..., None]) + distractor * weight[..., None] * rng.uniform(0, 1, size=3)
    mask = _mask(kind, rng)
    img[mask] = fg
    img = img + rng.normal(0, noise, size=img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def generate(n_train: int = 2000, n_val: int = 1000, n_test: int = 1000, seed: int = 0, noise: float = 0.12,
             contrast: float = 0.25, distractor: float = 0.6) -> dict[str, np.ndarray]:
    """Balanced splits (labels cycle through the classes, then shuffled), uint8 N x 16 x 16 x 3."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        labels = rng.permutation(np.arange(n) % len(CLASSES))
        out[f"x_{split}"] = np.stack([_image(int(k), rng, noise, contrast, distractor) for k in labels])
        out[f"y_{split}"] = labels.astype(np.int64)
    out["classes"] = np.array(CLASSES)
    return out


def write(path: Path, **kwargs) -> Path:
    """Write the set as an .npz (unless an identical file is already there: same arguments, same arrays)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = generate(**kwargs)
    if path.exists():
        with np.load(path) as old:
            if all(k in old and np.array_equal(old[k], v) for k, v in data.items()):
                return path
    np.savez_compressed(path, **data)
    return path
