"""Segmentation models: two architectures behind one interface, so training, inference and serving never branch.

``forward(x)`` takes float32 images ``[B, 3, S, S]`` in ``[0, 1]`` and returns ``(mask_logits [B, C, S, S],
head1 [B, C], head2 [B, C])`` without a sigmoid; C is 1 (Task 1, lesion) or 5 (Task 2, ``data.ATTRIBUTES`` order).

- ``multitask_unet``: the seed model of chvlyl/ISIC2018 (REFERENCE §3): a VGG16 encoder, decoder blocks with skip
  connections; head 1 = 1x1 conv + global average pooling on the centre block, head 2 = global max of the logits.
- ``unet``: the Peltarion tutorial's plain U-Net, small enough to train in a minute on a CPU at 64x64; it carries
  the same two heads so the seed loss (:mod:`lesion_ray.losses`) works with it too.
"""

from __future__ import annotations

import io
import pickle
import re
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError
from torch import nn

from lesion_ray import storage

# The channel layout of torchvision's ``vgg16().features``: conv widths, "M" = max-pool.
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class ModelConfig(BaseModel):
    """Architecture choice; nested under ``model:`` in a train spec and stored in config.json."""

    model_config = ConfigDict(extra="forbid", strict=True)

    architecture: Literal["unet", "multitask_unet"] = Field(
        "unet", description="unet: the tutorial's plain U-Net; multitask_unet: the seed VGG16 U-Net with two heads")
    task: Literal[1, 2] = Field(1, description="1: lesion mask; 2: the five attribute masks")
    input_size: int = Field(64, ge=32, description="images and masks are resized to input_size x input_size")
    num_filters: int = Field(
        32, ge=1, description="width: decoder filters (multitask_unet) or first-level filters (unet)")
    depth: int = Field(4, ge=1, le=7, description="unet only: number of down-sampling levels")
    pretrained_encoder: str | None = Field(
        None, description="multitask_unet only: a file/URI with VGG16 weights, e.g. a torchvision vgg16 state_dict")

    @property
    def num_classes(self) -> int:
        return 1 if self.task == 1 else 5

    @property
    def downsampling(self) -> int:
        """The input size must be a multiple of this."""
        return 32 if self.architecture == "multitask_unet" else 2**self.depth

    @model_validator(mode="after")
    def _fits(self) -> ModelConfig:
        if self.input_size % self.downsampling:
            raise PydanticCustomError("rule", f"must be a multiple of {self.downsampling} for {self.architecture}"
                                      + (f" with depth {self.depth}" if self.architecture == "unet" else "")
                                      + f", got {self.input_size}", {"key": "input_size"})
        if self.pretrained_encoder and self.architecture != "multitask_unet":
            raise PydanticCustomError("rule", "only multitask_unet has a VGG16 encoder to load; remove it or set "
                                              "architecture: multitask_unet", {"key": "pretrained_encoder"})
        return self


def conv_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True))


class DecoderBlock(nn.Module):
    """The seed decoder block: 3x3 conv + ReLU, then a 2x up-sampling transposed conv + ReLU."""

    def __init__(self, in_channels: int, middle_channels: int, out_channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            conv_relu(in_channels, middle_channels),
            nn.ConvTranspose2d(middle_channels, out_channels, kernel_size=4, stride=2, padding=1),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def _outputs(logits: torch.Tensor, center_head: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The shared interface: mask logits, head 1 (averaged over the centre), head 2 (the logits' maximum)."""
    return logits, F.adaptive_avg_pool2d(center_head, 1).flatten(1), F.adaptive_max_pool2d(logits, 1).flatten(1)


def vgg16_features() -> nn.Sequential:
    """VGG16's convolutional part with torchvision's exact module indices (0, 2, 5, ... 28),
    so a torchvision ``features.N.*`` state_dict maps onto ``N.*`` one to one."""
    layers: list[nn.Module] = []
    in_channels = 3
    for item in VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(in_channels, item, 3, padding=1), nn.ReLU(inplace=True)]
            in_channels = item
    return nn.Sequential(*layers)


# Slices of vgg16_features() that form the five encoder blocks (each ends before a max-pool).
VGG16_BLOCKS = ((0, 4), (5, 9), (10, 16), (17, 23), (24, 30))


class MultiTaskUNet(nn.Module):
    """The seed multi-task U-Net (chvlyl/ISIC2018, after TernausNet's UNet16)."""

    def __init__(self, num_classes: int = 5, num_filters: int = 32) -> None:
        super().__init__()
        f = num_filters
        self.encoder = vgg16_features()
        self.pool = nn.MaxPool2d(2, 2)
        self.center = DecoderBlock(512, f * 8 * 2, f * 8)
        self.dec5 = DecoderBlock(512 + f * 8, f * 8 * 2, f * 8)
        self.dec4 = DecoderBlock(512 + f * 8, f * 8 * 2, f * 8)
        self.dec3 = DecoderBlock(256 + f * 8, f * 4 * 2, f * 2)
        self.dec2 = DecoderBlock(128 + f * 2, f * 2 * 2, f)
        self.dec1 = conv_relu(64 + f, f)
        self.final = nn.Conv2d(f, num_classes, kernel_size=1)
        self.head1 = nn.Conv2d(f * 8, num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        skips = []
        for i, (start, stop) in enumerate(VGG16_BLOCKS):
            x = self.encoder[start:stop](self.pool(x) if i else x)
            skips.append(x)
        x = center = self.center(self.pool(x))
        for decoder, skip in zip((self.dec5, self.dec4, self.dec3, self.dec2, self.dec1), reversed(skips), strict=True):
            x = decoder(torch.cat([x, skip], 1))
        return _outputs(self.final(x), self.head1(center))


def double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """The tutorial's plain U-Net: ``depth`` down/up levels, ``num_filters`` doubled per level."""

    def __init__(self, num_classes: int = 1, num_filters: int = 32, depth: int = 4) -> None:
        super().__init__()
        widths = [num_filters * 2**level for level in range(depth + 1)]
        self.down = nn.ModuleList(double_conv(widths[lv - 1] if lv else 3, widths[lv]) for lv in range(depth))
        self.bottleneck = double_conv(widths[depth - 1], widths[depth])
        decoding = list(reversed(range(depth)))
        self.up = nn.ModuleList(nn.ConvTranspose2d(widths[lv + 1], widths[lv], 2, stride=2) for lv in decoding)
        self.up_conv = nn.ModuleList(double_conv(2 * widths[lv], widths[lv]) for lv in decoding)
        self.final = nn.Conv2d(widths[0], num_classes, kernel_size=1)
        self.head1 = nn.Conv2d(widths[depth], num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = center = self.bottleneck(x)
        for up, conv, skip in zip(self.up, self.up_conv, reversed(skips), strict=True):
            x = conv(torch.cat([up(x), skip], 1))
        return _outputs(self.final(x), self.head1(center))


def build_model(config: ModelConfig) -> nn.Module:
    """A freshly initialised model; loads ``pretrained_encoder`` when the config names one."""
    if config.architecture == "multitask_unet":
        model = MultiTaskUNet(config.num_classes, config.num_filters)
        if config.pretrained_encoder:
            load_vgg16_encoder(model, config.pretrained_encoder)
        return model
    return UNet(config.num_classes, config.num_filters, config.depth)


def load_tensors(uri: str, advice: str) -> Any:
    """``torch.load`` of a file that may hold only tensors, numbers, strings, lists and dicts (``weights_only``), so
    that a file from shared storage cannot run code. A file it refuses (a whole pickled model, a tampered
    checkpoint, something else) is a ValueError saying why, then ``advice``: torch's own advises turning
    weights_only off, the very thing to avoid."""
    try:
        return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as exc:
        unsafe = re.search(r"GLOBAL (\S+)", str(exc))
        # torch's own first sentence, but for the weights_only advice that opens an UnpicklingError's message
        detail = f" ({str(exc).split('. ')[0]})" if isinstance(exc, RuntimeError) and str(exc) else ""
        reason = (f"it holds a {unsafe[1].rstrip('.')} object, and loading objects other than tensors, numbers, "
                  "strings, lists and dicts could run code" if unsafe
                  else f"it is not a file torch.save wrote, or it is damaged{detail}")
        raise ValueError(f"refused to load {uri}: {reason}. {advice}") from None


def load_vgg16_encoder(model: MultiTaskUNet, uri: str) -> None:
    """Copy VGG16 convolution weights from a state_dict file (torchvision's ``features.N.*`` or a bare ``N.*``,
    either may be ``module.``-prefixed) into ``model.encoder``. Nothing is downloaded: the user provides the file."""
    state = load_tensors(uri, "Give the state_dict of a torchvision vgg16: torch.save(vgg16.state_dict(), path).")
    if not isinstance(state, dict):
        raise ValueError(f"pretrained_encoder {uri} is not a state_dict (got {type(state).__name__})")
    stripped = ((key.removeprefix("module.").removeprefix("features.").removeprefix("encoder."), tensor)
                for key, tensor in state.items())
    encoder = {key: tensor for key, tensor in stripped if key.split(".")[0].isdigit()}
    expected = model.encoder.state_dict()
    missing = sorted(set(expected) - set(encoder))
    if missing:
        raise ValueError(f"pretrained_encoder {uri} holds no VGG16 convolution weights for {', '.join(missing[:4])}: "
                         "give a torchvision vgg16 state_dict (keys features.0.weight ... features.28.bias)")
    for key, tensor in expected.items():
        if encoder[key].shape != tensor.shape:
            raise ValueError(f"pretrained_encoder {uri}: {key} has shape {tuple(encoder[key].shape)}, "
                             f"VGG16 needs {tuple(tensor.shape)}")
    model.encoder.load_state_dict({k: encoder[k] for k in expected})
