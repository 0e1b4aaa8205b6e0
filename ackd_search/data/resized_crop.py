"""ResizedCropFlip: torchvision's RandomResizedCrop + RandomHorizontalFlip for a whole batch on the device, drawn from
a CPU generator (so (seed, epoch) fixes every crop), the augmentation of images of LARGE_IMAGE pixels and more."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LARGE_IMAGE = 64  # from this side length on, training crops are resized crops (below: pad-crop + flip, `Augment`)


@dataclass(frozen=True)
class ResizedCropFlip:
    """A random crop of `scale` of the image's area and aspect ratio in `ratio`, resized (bilinear) back to the
    image's size, then a random horizontal flip (when `flip`): torchvision's RandomResizedCrop(size, scale, ratio)
    on the decoded image, including its fallback to the centre crop after `attempts` misses.

    Its views cannot be enumerated (the crop boxes are continuous), so the teacher-output cache turns itself off."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    attempts: int = 10

    def draw(self, n: int, height: int, width: int, gen: torch.Generator) -> torch.Tensor:
        """(n, 5) int64 rows (top, left, h, w, flip) for `n` images, every draw from `gen` (CPU)."""
        area = height * width
        target = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * torch.rand(n, self.attempts, generator=gen,
                                                                                      dtype=torch.float64))
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(lo + (hi - lo) * torch.rand(n, self.attempts, generator=gen, dtype=torch.float64))
        w = torch.round(torch.sqrt(target * aspect)).long()
        h = torch.round(torch.sqrt(target / aspect)).long()
        ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = ok.long().argmax(dim=1)  # torchvision keeps the first attempt that fits
        rows = torch.arange(n)
        w, h = w[rows, first], h[rows, first]
        fw, fh = self._fallback(height, width)
        missed = ~ok.any(dim=1)
        w, h = torch.where(missed, fw, w), torch.where(missed, fh, h)
        u_top, u_left, u_flip = (torch.rand(n, generator=gen, dtype=torch.float64) for _ in range(3))
        top = torch.floor(u_top * (height - h + 1)).long()
        left = torch.floor(u_left * (width - w + 1)).long()
        top = torch.where(missed, (height - h) // 2, top)
        left = torch.where(missed, (width - w) // 2, left)
        flips = (u_flip < 0.5).long() if self.flip else torch.zeros(n, dtype=torch.long)
        return torch.stack([top, left, h, w, flips], dim=1)

    def _fallback(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        # torchvision's fallback: the whole image, cut to the nearest allowed aspect ratio.
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h, w = height, int(round(height * max(self.ratio)))
        else:
            w, h = width, height
        return torch.tensor(w), torch.tensor(h)

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Crop, resize and flip the uint8 batch `x` (B, C, H, W) by `params` (B, 5) from `draw`, all on x's device:
        float32 values in [0, 255] of the same size as x."""
        return resized_crop_flip(x, params.to(x.device))


def _source_coords(start: torch.Tensor, length: torch.Tensor, size: int) -> torch.Tensor:
    """(B, size) source pixel coordinates of `size` output pixels over [start, start + length) per image.

    The same mapping as torch's bilinear interpolate (align_corners=False) of the cropped image, clamped to the
    crop as interpolate clamps to its input, so results match torchvision's crop-then-resize."""
    centres = torch.arange(size, device=start.device, dtype=torch.float32) + 0.5
    start, length = start.float()[:, None], length.float()[:, None]
    coords = start + centres[None, :] * length / size - 0.5
    return torch.minimum(torch.maximum(coords, start), start + length - 1)


def resized_crop_flip(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """The batched crop + resize + flip of `ResizedCropFlip.apply` (one grid_sample for the batch)."""
    b, _, height, width = x.shape
    top, left, h, w, flips = params.unbind(dim=1)
    ys = _source_coords(top, h, height)  # (B, H)
    xs = _source_coords(left, w, width)  # (B, W)
    xs = torch.where(flips.bool()[:, None], xs.flip(1), xs)
    gy = (2 * ys + 1) / height - 1  # pixel coordinate -> grid_sample's [-1, 1] (align_corners=False)
    gx = (2 * xs + 1) / width - 1
    grid = torch.stack([gx[:, None, :].expand(b, height, width), gy[:, :, None].expand(b, height, width)], dim=-1)
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
