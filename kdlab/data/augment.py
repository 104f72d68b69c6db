"""Batched, finite-view augmentation with view ids.

Every augmentation here is a *crop of a zero-padded input* plus an optional horizontal
flip, done on a whole batch as one gather (no per-image Python). Each sample's view is
an integer id: ``((dy · (2·pad_w + 1)) + dx) · n_flip + flip``; ``apply(x, view_ids)``
rebuilds any view exactly, so teacher outputs can be tabulated by (sample, view)
(pad-4 crop + flip: 9·9·2 = 162 views; ±2-pixel shifts: 5·5 = 25; 1-D ±s: 2s+1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError


@dataclass(frozen=True)
class Augmentation:
    """Random crops of an input padded by ``pad_h``/``pad_w`` zeros, optional flips."""

    name: str
    pad_h: int = 0
    pad_w: int = 0
    flip: bool = False
    one_d: bool = False  # made for 1-D signals (C, L): refused on images

    @property
    def num_views(self) -> int:
        return (2 * self.pad_h + 1) * (2 * self.pad_w + 1) * (2 if self.flip else 1)

    def check(self, input_shape: tuple[int, ...], source: str = "the data") -> None:
        """ConfigError naming ``data.augment`` unless this augmentation fits inputs of
        ``input_shape`` (one example, e.g. (1, 40) or (3, 32, 32)) from ``source``:
        padding height needs images (C, H, W), a 1-D shift needs signals (C, L), and the
        padding must be smaller than the input. ``none`` fits anything."""
        problem = self._mismatch(tuple(int(n) for n in input_shape), source)
        if problem:
            raise ConfigError(f"config key 'data.augment': {problem}")

    def _mismatch(self, shape: tuple[int, ...], source: str) -> str | None:
        """What is wrong with applying this augmentation to inputs of ``shape``, or None."""
        if self.num_views == 1:
            return None
        name = self.name
        if len(shape) not in (2, 3):
            return f"{name} needs images (C, H, W) or 1-D signals (C, L) but {source} gives shape {shape}; use none"
        if len(shape) == 2 and self.pad_h:
            return f"{name} pads images in height but {source} gives 1-D signals of shape {shape}; use shift1d or none"
        if len(shape) == 3 and self.one_d:
            return (f"{name} shifts 1-D signals but {source} gives images of shape {shape}; "
                    "use shift2, crop_flip or none")
        if len(shape) == 2 and self.pad_w >= shape[1]:
            return (f"{name} shifts by up to {self.pad_w} positions but {source} gives signals of length "
                    f"{shape[1]} (shape {shape}); use none")
        if len(shape) == 3 and (self.pad_h >= shape[1] or self.pad_w >= shape[2]):
            return (f"{name} pads images by {self.pad_h}×{self.pad_w} pixels but {source} gives images of only "
                    f"{shape[1]}×{shape[2]} (shape {shape}); use none")
        return None

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Uniformly random view ids, shape (B,), int64."""
        return torch.randint(0, self.num_views, (batch_size,), generator=generator)

    def decode(self, view_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """view id -> (dy, dx, flip): crop offsets into the padded input and the flip bit."""
        n_flip = 2 if self.flip else 1
        flip = view_ids % n_flip
        rest = view_ids // n_flip
        return rest // (2 * self.pad_w + 1), rest % (2 * self.pad_w + 1), flip

    def apply(self, x: torch.Tensor, view_ids: torch.Tensor) -> torch.Tensor:
        """The views ``view_ids`` of a batch ``x`` of shape (B, C, H, W) or (B, C, L)."""
        if self.num_views == 1:
            return x
        one_d = x.dim() == 3
        if one_d:
            if self.pad_h:
                raise ValueError(f"augmentation {self.name!r} pads height but the input is 1-D")
            x = x.unsqueeze(2)
        batch, _, height, width = x.shape
        padded = F.pad(x, (self.pad_w, self.pad_w, self.pad_h, self.pad_h))
        dy, dx, flip = self.decode(view_ids.to(x.device))
        rows = dy[:, None] + torch.arange(height, device=x.device)
        cols_fwd = torch.arange(width, device=x.device)
        cols = dx[:, None] + torch.where(flip[:, None].bool(), width - 1 - cols_fwd, cols_fwd)
        index = torch.arange(batch, device=x.device)[:, None, None]
        out = padded.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
        out = out.permute(0, 3, 1, 2)
        return out.squeeze(2) if one_d else out.contiguous()


AUGMENTATIONS = {
    "none": Augmentation("none"),
    "crop_flip": Augmentation("crop_flip", pad_h=4, pad_w=4, flip=True),  # CIFAR standard
    "shift2": Augmentation("shift2", pad_h=2, pad_w=2),  # ±2 px, Müller A.5 (MNIST)
    "shift1d": Augmentation("shift1d", pad_w=4, one_d=True),  # ±4 positions along a 1-D signal
}


def get_augmentation(name: str) -> Augmentation:
    try:
        return AUGMENTATIONS[name]
    except KeyError:
        raise ValueError(f"unknown augmentation {name!r}; known: {', '.join(AUGMENTATIONS)}") from None
