"""Model shapes, pretrained encoder loading and losses."""

from __future__ import annotations

import pytest
import torch

from lesion_ray.losses import LossConfig, compute_loss, soft_jaccard
from lesion_ray.models import ModelConfig, vgg16_features
from lesion_ray.models import build_model as build
from lesion_ray.spec import SpecError, from_dict


@pytest.mark.parametrize(
    ("config", "size"),
    [
        (ModelConfig(architecture="unet", task=1, num_filters=4, depth=3), 32),
        (ModelConfig(architecture="unet", task=2, num_filters=4, depth=2), 48),
        (ModelConfig(architecture="multitask_unet", task=2, num_filters=4), 64),
        (ModelConfig(architecture="multitask_unet", task=1, num_filters=4), 32),
    ],
)
def test_output_shapes(config: ModelConfig, size: int) -> None:
    model = build(config)
    logits, head1, head2 = model(torch.rand(2, 3, size, size))
    c = config.num_classes
    assert logits.shape == (2, c, size, size)
    assert head1.shape == head2.shape == (2, c)
    # Head 2 is the global max of the mask logits, per channel.
    torch.testing.assert_close(head2, logits.amax(dim=(2, 3)))


def test_seed_model_matches_reference_layout() -> None:
    model = build(ModelConfig(architecture="multitask_unet", task=2))
    assert model.final.out_channels == 5
    assert model.head1.in_channels == 32 * 8  # the 1x1 conv sits on the centre block's output
    deconvs = [m for m in model.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert len(deconvs) == 5 and all(m.kernel_size == (4, 4) and m.stride == (2, 2) for m in deconvs)


def test_pretrained_encoder_from_torchvision_layout(tmp_path) -> None:
    # A torchvision vgg16().state_dict() has features.N.* and classifier.N.* keys.
    features = vgg16_features()
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(4096, 25088)
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    model = build(ModelConfig(architecture="multitask_unet", num_filters=4, pretrained_encoder=str(path)))
    torch.testing.assert_close(model.encoder[28].weight, features[28].weight)
    torch.testing.assert_close(model.encoder[0].bias, features[0].bias)


def test_pretrained_encoder_rejects_other_weights(tmp_path) -> None:
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, path)
    with pytest.raises(ValueError, match="no VGG16 convolution weights"):
        build(ModelConfig(architecture="multitask_unet", num_filters=4, pretrained_encoder=str(path)))
    torch.save(vgg16_features(), path)  # the module itself, not its state_dict
    with pytest.raises(ValueError, match=r"resnet.pth: it holds a torch.nn.modules.container.Sequential object, .* "
                                         r"Give the state_dict of a torchvision vgg16: torch.save\(vgg16.state_dict"):
        build(ModelConfig(architecture="multitask_unet", num_filters=4, pretrained_encoder=str(path)))


def test_config_validation() -> None:
    with pytest.raises(SpecError, match="multiple of 16"):
        from_dict(ModelConfig, {"architecture": "unet", "depth": 4, "input_size": 72}, "t.yaml", "model")
    with pytest.raises(SpecError, match="model.pretrained_encoder"):
        from_dict(ModelConfig, {"architecture": "unet", "pretrained_encoder": "vgg.pth"}, "t.yaml", "model")
    from_dict(ModelConfig, {"architecture": "multitask_unet", "input_size": 512}, "t.yaml", "model")


def test_losses() -> None:
    mask = torch.zeros(2, 5, 8, 8)
    mask[:, :2, 2:6, 2:6] = 1
    present = mask.amax(dim=(2, 3))
    good_logits = (mask * 2 - 1) * 8
    good = (good_logits, (present * 2 - 1) * 8, good_logits.amax(dim=(2, 3)))
    bad = tuple(-o for o in good)
    seed = LossConfig(name="seed")
    assert compute_loss(good, mask, present, seed) < 0.01 < compute_loss(bad, mask, present, seed)
    assert soft_jaccard(good_logits, mask) > 0.99
    # bce ignores the heads; the seed loss adds them with their weights.
    bce = LossConfig(name="bce")
    wrong_heads = (good_logits, -good[1], -good[2])
    assert compute_loss(wrong_heads, mask, present, bce) == compute_loss(good, mask, present, bce)
    no_heads = LossConfig(name="seed", head1_weight=0.0, head2_weight=0.0)
    assert compute_loss(wrong_heads, mask, present, seed) > 1.0 > compute_loss(wrong_heads, mask, present, no_heads)
