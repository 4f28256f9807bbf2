"""The training augmentation, plain torch on the workers' device (usable without Ray)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field


class AugmentConfig(BaseModel):
    """Random augmentation on the workers; geometry is applied identically to image and masks."""

    model_config = ConfigDict(extra="forbid", strict=True)

    flip: bool = Field(True, description="random horizontal and vertical flips")
    affine: bool = Field(True, description="random rotation, translation and scale")
    rotation: float = Field(20.0, ge=0, le=180, description="max rotation in degrees")
    translate: float = Field(0.1, ge=0, le=0.5, description="max shift as a share of the image size")
    scale: float = Field(0.1, ge=0, le=0.5, description="max zoom in/out as a share")
    color: bool = Field(True, description="random brightness and saturation (image only)")
    brightness: float = Field(0.2, ge=0, le=1, description="max brightness change as a share")
    saturation: float = Field(0.2, ge=0, le=1, description="max saturation change as a share")


def augment(image: torch.Tensor, mask: torch.Tensor, config: AugmentConfig,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flips and affine warps applied identically to ``image`` [B,3,S,S] and ``mask``
    [B,C,S,S]; brightness and saturation jitter on the image only. Values stay in [0, 1]."""
    b, device = len(image), image.device

    def uniform(limit: float, *shape: int) -> torch.Tensor:
        return (torch.rand(b, *shape, device=device, generator=generator) * 2 - 1) * limit

    if config.flip:
        for dim in (3, 2):
            flip = torch.rand(b, device=device, generator=generator) < 0.5
            image = torch.where(flip[:, None, None, None], image.flip(dim), image)
            mask = torch.where(flip[:, None, None, None], mask.flip(dim), mask)
    if config.affine:
        angle = uniform(config.rotation * torch.pi / 180)
        scale = 1 + uniform(config.scale)
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        shift = uniform(config.translate * 2, 2)  # affine_grid coordinates span [-1, 1]
        theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, list(image.shape), align_corners=False)
        image = F.grid_sample(image, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        mask = F.grid_sample(mask, grid, mode="nearest", padding_mode="reflection", align_corners=False)
    if config.color:
        brightness = 1 + uniform(config.brightness, 1, 1, 1)
        saturation = 1 + uniform(config.saturation, 1, 1, 1)
        grey = (image * torch.tensor([0.299, 0.587, 0.114], device=device)[:, None, None]).sum(1, keepdim=True)
        image = ((grey + (image - grey) * saturation) * brightness).clamp(0, 1)
    return image, mask
