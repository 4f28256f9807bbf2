"""One inference path for batch (:mod:`lesion_ray.predict`) and online (:mod:`lesion_ray.serve`)
prediction, on the model's device: model inputs -> probabilities (:mod:`lesion_ray.postprocess` turns them
into masks, PNGs and overlays). Everything here imports torch; the CPU tasks around it do not.

- :class:`Runner`: a model made ready once for its device and :class:`ModelRuntime` (precision, memory
  format, ``torch.compile``), then batches of uint8 images -> sigmoid mask probabilities and both
  heads' probabilities, optionally averaged over flips (test-time augmentation); the images are scaled
  on the model's device, so rows cross Ray's object store at a quarter of float32's size;
- :class:`ModelInputs`: encoded images decoded in the inference actor (``decode: gpu``: nvJPEG on its GPU);
  :class:`DeviceResize` and :func:`resize`: decoded images resized on the GPU (training on GPUs, Serve).
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import nn

from lesion_ray import preprocess, report

Precision = Literal["fp32", "bf16", "fp16"]
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # fp32: no autocast


class ModelRuntime(BaseModel):
    """How a model runs for inference; the predict and serve specs take these keys."""

    precision: Precision = Field("fp32", description="fp32, or bf16/fp16 mixed precision (autocast; bf16 also on "
                                                     "CPUs, fp16 is for GPUs)")
    channels_last: bool = Field(False, description="NHWC memory format (faster convolutions on GPUs with bf16/fp16)")
    compile: bool = Field(False, description="torch.compile the model once per process (minutes of start-up; "
                                             "falls back to eager with a warning where it fails)")


class Runner:
    """A model ready for batches on ``device``: eval mode, memory format and (with ``compile``) compiled once,
    with a warm-up pass of ``batch_size`` images so that compilation happens here, not in the first request.
    A compiled model sees only that batch size (smaller batches are padded): it never compiles again."""

    def __init__(self, model: nn.Module, device: str | torch.device, runtime: ModelRuntime, input_size: int,
                 batch_size: int) -> None:
        self.device = torch.device(device)
        self.runtime = runtime
        self.autocast = AUTOCAST_DTYPES.get(runtime.precision)
        model = model.to(self.device).eval()
        if runtime.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model, self.batch_size, self.compiled = model, batch_size, False
        self.compile_error: str | None = None  # why torch.compile was given up, if it was
        if runtime.compile:
            self.model, self.compiled = torch.compile(model), True
            try:
                self(torch.zeros(batch_size, 3, input_size, input_size, dtype=torch.uint8))
            except Exception as exc:  # no compiler, an unsupported op or device: eager still works
                self.compile_error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
                report.info(f"warning: torch.compile failed, the model runs uncompiled: {self.compile_error}")
                self.model, self.compiled = model, False

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, tta: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """uint8 [B, 3, S, S] images (0-255; float in [0, 1] also taken) on any device -> float32 mask
        probabilities [B, C, S, S] and both heads' probabilities [B, C], on the model's device."""
        count = len(images)
        x = images.to(self.device, non_blocking=True)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        if self.compiled and count < self.batch_size:  # compiled for one batch size
            x = torch.cat([x, x.new_zeros(self.batch_size - count, *x.shape[1:])])
        if self.runtime.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            outputs = _forward(self.model, x, tta)
        return tuple(o[:count].float() for o in outputs)  # type: ignore[return-value]


def _forward(model: nn.Module, images: torch.Tensor, tta: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask probabilities [B, C, S, S] and both heads' "present" probabilities [B, C]; with ``tta``,
    the average over the image and its horizontal and vertical flips."""
    flips = [(), (3,), (2,)] if tta else [()]
    probs = head1 = head2 = 0
    for dims in flips:
        logits, h1, h2 = model(images.flip(dims) if dims else images)
        p = torch.sigmoid(logits)
        probs = probs + (p.flip(dims) if dims else p)
        head1, head2 = head1 + torch.sigmoid(h1), head2 + torch.sigmoid(h2)
    return probs / len(flips), head1 / len(flips), head2 / len(flips)


def resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [3, size, size], bilinear with antialiasing (a triangle filter: no overshoot).

    On CPU the resize runs on uint8 (torch's channels-last uint8 kernel, several times faster than
    float32); elsewhere in float32, rounded back, so both agree within 1/255.
    """
    if image.shape[-2:] == (size, size):
        return image
    cpu = image.device.type == "cpu"
    resized = F.interpolate(image[None] if cpu else image[None].float(), size=(size, size), mode="bilinear",
                            antialias=True, align_corners=False)[0]
    return resized if cpu else resized.round_().clamp_(0, 255).to(torch.uint8)


# EXIF orientation -> the torch ops that undo it, as PIL's ImageOps.exif_transpose (on [.., H, W] tensors).
_ORIENT = {
    2: lambda x: x.flip(-1),
    3: lambda x: x.flip(-1, -2),
    4: lambda x: x.flip(-2),
    5: lambda x: x.transpose(-1, -2),
    6: lambda x: x.rot90(-1, (-2, -1)),
    7: lambda x: x.transpose(-1, -2).flip(-1, -2),
    8: lambda x: x.rot90(1, (-2, -1)),
}


def _nvjpeg() -> Any:
    """torchvision's JPEG decoder, or None without torchvision (it is not a dependency: a GPU image has it)."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None
    return functools.partial(decode_jpeg, mode=ImageReadMode.RGB, device="cuda")


class ModelInputs:
    """Encoded images -> model inputs inside an inference actor (``decode: gpu``): JPEGs decoded by nvJPEG
    on the actor's GPU and resized there, one batched call; a PNG, a JPEG nvJPEG refuses, or an actor
    without a GPU or torchvision takes the CPU path (:func:`lesion_ray.preprocess.decode_image`) per image.
    Headers are checked on the CPU first (:func:`lesion_ray.preprocess.open_image`), so a bad, truncated or
    oversized input is an error row either way."""

    def __init__(self, device: str | torch.device, size: int, max_pixels: int) -> None:
        self.device, self.size, self.max_pixels = torch.device(device), size, max_pixels
        self.decode_jpeg = _nvjpeg() if self.device.type == "cuda" else None
        self.on_gpu = self.on_cpu = 0  # images decoded each way, for the benchmark

    def __call__(self, blobs: list[bytes]) -> tuple[torch.Tensor, list[tuple[int, int]], list[str]]:
        """uint8 [B, 3, size, size] on the device, the original (height, width) and an error ("" if none) each."""
        out = torch.zeros(len(blobs), 3, self.size, self.size, dtype=torch.uint8, device=self.device)
        sizes, errors = [(0, 0)] * len(blobs), [""] * len(blobs)
        jpegs: list[tuple[int, int]] = []  # (index, EXIF orientation) of the images for nvJPEG
        on_cpu: list[int] = []
        for i, blob in enumerate(blobs):
            try:
                im = preprocess.open_image(blob, self.max_pixels)
                orientation = preprocess.orientation(im)
                sizes[i] = preprocess.oriented_size(im, orientation)
                # A JPEG without its end marker (truncated) goes to PIL, which names it; nvJPEG may pad it silently.
                if self.decode_jpeg and im.format == "JPEG" and im.mode in ("RGB", "L") and blob[-2:] == b"\xff\xd9":
                    jpegs.append((i, orientation))
                else:
                    on_cpu.append(i)
            except preprocess.BadImage as exc:
                errors[i] = exc.reason
        for (i, orientation), decoded in zip(jpegs, self._gpu_decode([blobs[i] for i, _ in jpegs]), strict=True):
            if decoded is None:  # nvJPEG refused it: PIL decides, and names the error if there is one
                on_cpu.append(i)
                continue
            out[i] = resize(_ORIENT[orientation](decoded) if orientation in _ORIENT else decoded, self.size)
            self.on_gpu += 1
        for i in on_cpu:
            try:
                pixels, _ = preprocess.decode_image(blobs[i], max_pixels=self.max_pixels, target=self.size)
                out[i] = torch.from_numpy(preprocess.to_model_input([pixels], self.size)[0])
                self.on_cpu += 1
            except preprocess.BadImage as exc:
                errors[i], sizes[i] = exc.reason, (0, 0)
            except Exception as exc:  # a decoder bug on one file must not take down the other items
                errors[i], sizes[i] = f"{type(exc).__name__}: {exc}", (0, 0)
        return out, sizes, errors

    def _gpu_decode(self, blobs: list[bytes]) -> list[torch.Tensor | None]:
        """One batched nvJPEG call; when it fails, image by image, None for those nvJPEG refuses."""
        if not blobs:
            return []
        data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        try:
            return list(self.decode_jpeg(data))
        except RuntimeError:
            pass
        decoded: list[torch.Tensor | None] = []
        for one in data:
            try:
                decoded.append(self.decode_jpeg(one))
            except RuntimeError:
                decoded.append(None)
        return decoded


class DeviceResize:
    """Decoded rows (ragged RGB uint8 ``pixels``) resized on the GPU in a Ray Data actor, the CUDA context made once
    per actor: the GPU branch of :func:`lesion_ray.preprocess.decoded`."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        out = {k: v for k, v in batch.items() if k != "pixels"}
        # torch refuses read-only arrays
        images = [torch.from_numpy(p if p.flags.writeable else p.copy()).to("cuda", non_blocking=True).permute(2, 0, 1)
                  for p in batch["pixels"]]
        out["image"] = torch.stack([resize(image, self.size) for image in images]).cpu().numpy()
        return out
