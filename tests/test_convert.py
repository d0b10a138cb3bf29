"""PyTorch UNet checkpoints as kunet models (:mod:`kunet.convert`, ``kunet convert``).

Both layouts' PyTorch networks are defined here, small, with random BatchNorm statistics and affine
parameters (so that BatchNorm and its epsilon matter), in eval mode; the converted kunet model must
give their outputs (channels-last) on every backend, keep them through saving, and refuse anything
that does not fit with one error listing every problem and no weight changed.
"""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest

import kunet
from kunet.cli import main
from kunet.convert import from_torch_state_dict, unet_from_torch
from kunet.layers import centred_padding

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

# Loading any never-trained kunet model warns that its (unbuilt) optimizer has no saved state
pytestmark = pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")

TOLERANCE = 1e-4  # max |kunet - torch|, relative to the output's largest magnitude when above 1


# ---------------------------------------------------------------------------------- torch twins
def conv_bn_relu_twice(cin, cout, mid=None, bias=False):
    mid = mid or cout
    return nn.Sequential(
        nn.Conv2d(cin, mid, 3, padding=1, bias=bias), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
        nn.Conv2d(mid, cout, 3, padding=1, bias=bias), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )  # fmt: skip


class TutorialDoubleConv(nn.Module):
    def __init__(self, cin, cout, bias=False):
        super().__init__()
        self.conv = conv_bn_relu_twice(cin, cout, bias=bias)

    def forward(self, x):
        return self.conv(x)


class TutorialUNet(nn.Module):
    """The tutorial UNet's structure and key names: downs, ups, bottleneck, final_conv; at sizes
    that are not multiples of 2**depth it resizes the up-sampled tensor to the skip's size."""

    def __init__(self, in_channels=3, out_channels=1, features=(4, 8, 16), bias=False):
        super().__init__()
        self.downs, self.ups = nn.ModuleList(), nn.ModuleList()
        self.pool = nn.MaxPool2d(2, 2)
        for f in features:
            self.downs.append(TutorialDoubleConv(in_channels, f, bias))
            in_channels = f
        for f in reversed(features):
            self.ups.append(nn.ConvTranspose2d(2 * f, f, 2, 2))
            self.ups.append(TutorialDoubleConv(2 * f, f, bias))
        self.bottleneck = TutorialDoubleConv(features[-1], 2 * features[-1], bias)
        self.final_conv = nn.Conv2d(features[0], out_channels, 1)

    def forward(self, x):
        skips = []
        for down in self.downs:
            x = down(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for k, skip in zip(range(0, len(self.ups), 2), reversed(skips), strict=True):
            x = self.ups[k](x)
            if x.shape != skip.shape:
                x = F.interpolate(x, size=skip.shape[2:], mode="bilinear", align_corners=False)
            x = self.ups[k + 1](torch.cat((skip, x), dim=1))
        return self.final_conv(x)


class MilesialDoubleConv(nn.Module):
    def __init__(self, cin, cout, mid=None):
        super().__init__()
        self.double_conv = conv_bn_relu_twice(cin, cout, mid)

    def forward(self, x):
        return self.double_conv(x)


class MilesialDown(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), MilesialDoubleConv(cin, cout))

    def forward(self, x):
        return self.maxpool_conv(x)


class MilesialUp(nn.Module):
    def __init__(self, cin, cout, bilinear=False):
        super().__init__()
        if bilinear:
            self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
            self.conv = MilesialDoubleConv(cin, cout, cin // 2)
        else:
            self.up = nn.ConvTranspose2d(cin, cin // 2, 2, 2)
            self.conv = MilesialDoubleConv(cin, cout)

    def forward(self, x1, x2):  # pads the up-sampled x1 to the skip x2's size, centred
        x1 = self.up(x1)
        dy, dx = x2.size(2) - x1.size(2), x2.size(3) - x1.size(3)
        x1 = F.pad(x1, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.conv(torch.cat([x2, x1], dim=1))


class MilesialOutConv(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        return self.conv(x)


class MilesialUNet(nn.Module):
    """milesial/Pytorch-UNet's structure and key names (inc, down<k>, up<k>, outc) with the widths
    ``widths`` (the repository's: 64, 128, 256, 512)."""

    def __init__(self, n_channels=1, n_classes=1, widths=(4, 8, 16, 32), bilinear=False):
        super().__init__()
        self.depth, factor = len(widths), 2 if bilinear else 1
        self.inc = MilesialDoubleConv(n_channels, widths[0])
        for k in range(1, self.depth + 1):
            out = widths[k] if k < self.depth else 2 * widths[-1] // factor
            setattr(self, f"down{k}", MilesialDown(widths[k - 1], out))
        for k in range(1, self.depth + 1):
            level = self.depth - k
            out = widths[level] // factor if level else widths[0]
            setattr(self, f"up{k}", MilesialUp(2 * widths[level], out, bilinear))
        self.outc = MilesialOutConv(widths[0], n_classes)

    def forward(self, x):
        xs = [self.inc(x)]
        for k in range(1, self.depth + 1):
            xs.append(getattr(self, f"down{k}")(xs[-1]))
        x = xs[-1]
        for k in range(1, self.depth + 1):
            x = getattr(self, f"up{k}")(x, xs[self.depth - k])
        return self.outc(x)


def twin(network, *args, seed=0, **kwargs):
    """``network(*args, **kwargs)`` seeded, with random BatchNorm statistics and affine parameters,
    in eval mode. One running variance is below Keras' epsilon minus PyTorch's, which the
    conversion must fold into gamma."""
    torch.manual_seed(seed)
    net = network(*args, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(0.5 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(1.5 * torch.rand(n, generator=g) + 0.2)
                m.num_batches_tracked.fill_(100)
            elif isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
        first_bn = next(m for m in net.modules() if isinstance(m, nn.BatchNorm2d))
        first_bn.running_var[0] = 2e-4
    return net.eval()


def torch_output(net, images):
    """The PyTorch network on channels-last ``images``, channels last."""
    with torch.no_grad():
        out = net(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
    return out.numpy().transpose(0, 2, 3, 1)


def assert_close(got, want):
    assert got.shape == want.shape
    scale = max(1.0, float(np.abs(want).max()))
    assert np.abs(got - want).max() <= TOLERANCE * scale, np.abs(got - want).max()


def images(size, channels, seed=0):
    return np.random.default_rng(seed).normal(size=(2, *size, channels)).astype("float32")


def state_dict(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


# (torch network, kunet filters, input channels, classes, a size divisible by 2**depth)
CASES = {
    "tutorial": (lambda: twin(TutorialUNet, 3, 2, (4, 8, 16)), (4, 8, 16), 3, 2, (40, 48)),
    "milesial": (lambda: twin(MilesialUNet, 1, 1, (4, 8, 16)), (4, 8, 16), 1, 1, (32, 48)),
}


@pytest.fixture(scope="module")
def conversions():
    """Per layout: ``(layout, torch network, its state dict, converted kunet model)``, made once."""
    made = {}

    def get(layout):
        if layout not in made:
            net = CASES[layout][0]()
            sd = state_dict(net)
            made[layout] = layout, net, sd, unet_from_torch(sd)
        return made[layout]

    return get


@pytest.fixture(params=sorted(CASES))
def converted(request, conversions):
    return conversions(request.param)


@pytest.fixture
def tutorial(conversions):
    return conversions("tutorial")


# ---------------------------------------------------------------------------------- parity
def test_infers_the_architecture(converted):
    layout, net, sd, model = converted
    _, filters, channels, classes, _ = CASES[layout]
    assert isinstance(model, kunet.UNet)
    assert model.filters == filters
    assert model.unet_input_shape == (None, None, channels)
    assert model.num_classes == classes
    assert model.output_activation is None  # logits, as the PyTorch models return
    assert model.count_params() == sum(p.numel() for p in net.parameters()) + sum(
        b.numel() for n, b in net.named_buffers() if "running" in n
    )


def test_outputs_match_torch_at_a_multiple_of_two_to_the_depth(converted):
    layout, net, sd, model = converted
    _, _, channels, _, size = CASES[layout]
    x = images(size, channels)
    assert_close(model.predict(x, verbose=0), torch_output(net, x))


def test_at_other_sizes_kunet_equals_torch_on_the_zero_padded_input(converted):
    """kunet zero-pads the input (centred) to a multiple of 2**depth and crops the output back;
    the tutorial network resizes inside its decoder and milesial's pads there, so their own
    outputs at such sizes differ from kunet's, and parity holds on the padded input."""
    layout, net, sd, model = converted
    _, _, channels, _, _ = CASES[layout]
    x = images((37, 45), channels, seed=1)
    (top, bottom), (left, right) = centred_padding(x.shape[1:3], model.size_multiple)
    padded = np.pad(x, [(0, 0), (top, bottom), (left, right), (0, 0)])
    want = torch_output(net, padded)[:, top : top + 37, left : left + 45]
    got = model.predict(x, verbose=0)
    assert_close(got, want)
    own = torch_output(net, x)
    assert own.shape == got.shape and not np.allclose(own, got, atol=1e-3)


def test_saved_and_loaded_model_gives_the_same_outputs(converted, tmp_path):
    layout, net, sd, model = converted
    _, _, channels, _, size = CASES[layout]
    x = images(size, channels, seed=2)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    assert_close(loaded.predict(x, verbose=0), torch_output(net, x))


def test_convolution_biases_before_batch_norm_are_folded_in():
    net = twin(TutorialUNet, 1, 2, (4, 8), bias=True, seed=3)
    model = unet_from_torch(net.state_dict())
    x = images((16, 24), 1, seed=3)
    assert_close(model.predict(x, verbose=0), torch_output(net, x))


def test_wrapped_prefixed_numpy_state_dicts_are_accepted(converted):
    layout, net, sd, model = converted
    _, _, channels, _, size = CASES[layout]
    checkpoint = {
        "epoch": 7,
        "model_state_dict": {f"module.{k}": v.numpy() for k, v in sd.items()},
    }
    again = from_torch_state_dict(kunet.UNet.from_config(model.get_config()), checkpoint)
    for a, b in zip(again.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    other = unet_from_torch({"state_dict": {f"module.{k}": v for k, v in sd.items()}})
    x = images(size, channels, seed=4)
    np.testing.assert_allclose(other.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


# ---------------------------------------------------------------------------------- refusals
def test_misfit_keys_are_all_listed_and_no_weight_changes(tutorial):
    layout, net, sd, model = tutorial
    before = [w.copy() for w in model.get_weights()]
    bad = {k: 2 * v for k, v in sd.items()}  # would change every weight if any were assigned
    del bad["downs.0.conv.1.running_var"]
    bad["extra.weight"] = torch.zeros(3, 3)
    bad["ups.1.conv.0.weight"] = torch.zeros(8, 15, 3, 3)
    with pytest.raises(ValueError) as error:
        from_torch_state_dict(model, bad)
    message = str(error.value)
    assert "no weight was changed" in message
    assert "missing (1): downs.0.conv.1.running_var (4,)" in message
    assert "unexpected (1): extra.weight (3, 3)" in message
    assert (
        "ups.1.conv.0.weight: torch (8, 15, 3, 3) vs kunet decoder3_conv/conv1/kernel (3, 3, 32, 16)"
        in message
    )
    for a, b in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_another_architecture_is_named_as_such():
    resnet = {
        "conv1.weight": np.zeros((64, 3, 7, 7), "float32"),
        "bn1.weight": np.ones(64, "float32"),
        "layer1.0.conv1.weight": np.zeros((64, 64, 3, 3), "float32"),
        "fc.weight": np.zeros((1000, 512), "float32"),
    }
    with pytest.raises(ValueError, match=r"'tutorial'.*'milesial'.*conv1, fc, layer1"):
        unet_from_torch(resnet)


def test_a_model_that_cannot_hold_the_weights_is_refused(tutorial):
    layout, net, sd, model = tutorial
    with pytest.raises(ValueError, match="layout"):
        unet_from_torch(sd, layout="milesial")
    plain = kunet.UNet(num_classes=2, filters=(4, 8, 16), batch_norm=False)
    with pytest.raises(ValueError, match="this one has batch_norm=False"):
        from_torch_state_dict(plain, sd)


def test_milesial_bilinear_variant_is_refused_with_the_reason():
    sd = twin(MilesialUNet, 1, 1, (4, 8, 16), bilinear=True).state_dict()
    with pytest.raises(ValueError, match="bilinear=True.*only bilinear=False"):
        unet_from_torch(sd)


# ---------------------------------------------------------------------------------- the command
def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_converts_and_refuses_to_overwrite(tmp_path, capsys):
    net = twin(TutorialUNet, 1, 1, (4, 8), seed=5)
    pth, out = tmp_path / "unet.pth", tmp_path / "out" / "unet.keras"
    torch.save(net.state_dict(), pth)
    code, stdout, err = run(capsys, "convert", "--torch", pth, "--out", out)
    assert code == 0, err
    assert "tutorial layout" in stdout and "filters (4, 8)" in stdout and "1 class" in stdout
    model = keras.models.load_model(out)
    x = images((16, 16), 1, seed=5)
    assert_close(model.predict(x, verbose=0), torch_output(net, x))

    stat, data = os.stat(out), out.read_bytes()
    code, stdout, err = run(capsys, "convert", "--torch", pth, "--out", out)
    assert code == 2 and err.startswith("kunet: error:") and "--overwrite" in err
    assert os.stat(out).st_mtime_ns == stat.st_mtime_ns and out.read_bytes() == data
    code, stdout, err = run(capsys, "convert", "--torch", pth, "--out", out, "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in out.parent.iterdir()) == ["unet.keras"]


@pytest.mark.parametrize("content", ["garbage", "resnet"])
def test_cli_bad_checkpoint_writes_nothing(tmp_path, capsys, content):
    pth = tmp_path / "bad.pth"
    if content == "garbage":
        pth.write_bytes(b"this is not a checkpoint")
    else:
        torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}, pth)
    out = tmp_path / "out" / "m.keras"
    code, stdout, err = run(capsys, "convert", "--torch", pth, "--out", out)
    assert code == 2
    assert err.startswith(f"kunet: error: --torch {pth}:") and "\n" not in err.strip()
    assert not out.parent.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pth"]
