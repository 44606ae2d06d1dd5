"""kernels.adapters: subclasses whose forward is their own, swapped when an adapter knows what they compute (timm's
Conv2dSame, kernels.conv2d_same, matched by name: timm is not installed, a stand-in with its module, qualname and
forward is), else left in PyTorch with the reason; the registry and `register`; the asymmetric padding the conv op
takes for it; empty containers in the table."""

import copy
import math
from typing import List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import triton_workbench.kernels.nn as knn
from triton_workbench.kernels import adapters, ops
from triton_workbench.kernels.attention import TritonMultiheadAttention
from triton_workbench.kernels.conv2d_same import TritonConv2dSame, same_padding
from numerics import output_after_backward, relative_error


# timm's padding.py and conv2d_same.py (timm 1.0), as they are


def get_same_padding(x: int, kernel_size: int, stride: int, dilation: int):
    if isinstance(x, torch.Tensor):
        return torch.clamp(((x / stride).ceil() - 1) * stride + (kernel_size - 1) * dilation + 1 - x, min=0)
    else:
        return max((math.ceil(x / stride) - 1) * stride + (kernel_size - 1) * dilation + 1 - x, 0)


def pad_same(x, kernel_size: List[int], stride: List[int], dilation: List[int] = (1, 1), value: float = 0):
    ih, iw = x.size()[-2:]
    pad_h = get_same_padding(ih, kernel_size[0], stride[0], dilation[0])
    pad_w = get_same_padding(iw, kernel_size[1], stride[1], dilation[1])
    x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=value)
    return x


def conv2d_same(x, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, stride: Tuple[int, int] = (1, 1),
                padding: Tuple[int, int] = (0, 0), dilation: Tuple[int, int] = (1, 1), groups: int = 1):
    x = pad_same(x, weight.shape[-2:], stride, dilation)
    return F.conv2d(x, weight, bias, stride, (0, 0), dilation, groups)


class Conv2dSame(nn.Conv2d):
    """ Tensorflow like 'SAME' convolution wrapper for 2D convolutions
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True):
        super(Conv2dSame, self).__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups, bias)

    def forward(self, x):
        return conv2d_same(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


Conv2dSame.__module__, Conv2dSame.__qualname__ = "timm.layers.conv2d_same", "Conv2dSame"


def _records(model: nn.Module) -> dict[str, tuple[str, str]]:
    return {record.path: (record.action, record.detail) for record in model.swap_records}


class _Stem(nn.Module):
    """tf_efficientnet's pattern: a Conv2dSame (stride 2) -> BN -> SiLU, then a depthwise Conv2dSame."""

    def __init__(self, kernel: int = 3, stride: int = 2, dilation: int = 1):
        super().__init__()
        self.conv = Conv2dSame(3, 4, kernel, stride=stride, dilation=dilation, bias=False)
        self.bn, self.act = nn.BatchNorm2d(4), nn.SiLU()
        self.dw = Conv2dSame(4, 4, (2, 3), stride=(1, 2), groups=4)

    def forward(self, x):
        return self.dw(self.act(self.bn(self.conv(x))))


@pytest.mark.parametrize("kernel, stride, dilation", [(3, 2, 1), (4, 1, 1), (3, 3, 2), (5, 2, 1)])
@pytest.mark.parametrize("size", [(7, 6), (8, 5)])
def test_conv2d_same_is_swapped_and_matches_timm_in_float64(kernel, stride, dilation, size):
    torch.manual_seed(0)
    model = _Stem(kernel, stride, dilation)
    reference = copy.deepcopy(model).double()
    keys, parameters = list(model.state_dict()), list(model.parameters())
    swapped = knn.swap(model)
    records = _records(swapped)
    assert records["conv"] == records["dw"] == ("swapped", "TF 'SAME' padding from the input size, on the Triton conv "
                                                           "(adapter)")
    assert "(model)" not in records  # traced, not walked: the BN -> SiLU still fuses
    assert records["bn"][0] == "fused"
    assert isinstance(model.conv, TritonConv2dSame) and isinstance(swapped.get_submodule("dw"), TritonConv2dSame)
    assert list(swapped.state_dict()) == keys and all(a is b for a, b in zip(swapped.parameters(), parameters))
    x = torch.randn(2, 3, *size)
    for mode in ("train", "eval"):
        getattr(swapped, mode)(), getattr(reference, mode)()
        outputs = [output_after_backward(net, inputs) for net, inputs in ((swapped, x), (reference, x.double()))]
        assert outputs[0].shape == outputs[1].shape and relative_error(*outputs) < 1e-4
        for (name, ours), theirs in zip(swapped.named_parameters(), reference.parameters()):
            assert relative_error(ours.grad, theirs.grad) < 1e-4, (mode, name)


def test_the_adapter_takes_channels_last_unbatched_and_older_timms_name():
    torch.manual_seed(1)
    legacy = type("Conv2dSame", (Conv2dSame,), {})  # keeps timm's forward: matched through its parent
    legacy.__module__ = "timm.models.layers.conv2d_same"  # timm < 0.9 kept it there
    for conv in (Conv2dSame(3, 5, 3, stride=2), legacy(3, 5, 3, stride=2)):
        assert adapters.find(conv) is not None
        adapted = TritonConv2dSame.from_conv(conv)
        assert adapted.weight is conv.weight and "padding=SAME" in repr(adapted)
        for x in (torch.randn(2, 3, 7, 8).contiguous(memory_format=torch.channels_last), torch.randn(3, 6, 5)):
            torch.testing.assert_close(adapted(x), conv(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(TypeError, match="conv must be an nn.Conv2d"):
        TritonConv2dSame.from_conv(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        adapted([1.0])


def test_same_padding_is_tensorflows():
    assert same_padding((224, 224), (3, 3), (2, 2), (1, 1)) == (0, 1, 0, 1)  # odd total: the extra one after
    assert same_padding((7, 6), (3, 5), (1, 1), (2, 1)) == (2, 2, 2, 2)
    assert same_padding((5, 9), (1, 3), (4, 3), (1, 1)) == (0, 0, 0, 0)  # stride larger than needed: none
    for size in range(1, 12):
        for k, s, d in ((3, 2, 1), (4, 3, 2), (2, 1, 1)):
            total = get_same_padding(size, k, s, d)
            assert same_padding((size, 1), (k, 1), (s, 1), (d, 1))[:2] == (total // 2, total - total // 2)


def test_conv2d_takes_four_sided_padding_and_names_a_bad_one():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(1, 2, 5, 6, generator=generator, dtype=torch.float64)
    weight = torch.randn(3, 2, 3, 2, generator=generator, dtype=torch.float64)
    x32, w32 = x.float().requires_grad_(), weight.float().requires_grad_()
    out = ops.conv2d(x32, w32, None, 1, (0, 2, 1, 0))
    x.requires_grad_(), weight.requires_grad_()
    expected = F.conv2d(F.pad(x, (1, 0, 0, 2)), weight)
    assert out.shape == expected.shape and relative_error(out, expected) < 1e-5
    grad = torch.randn(expected.shape, generator=generator, dtype=torch.float64)
    out.backward(grad.float()), expected.backward(grad)
    assert relative_error(x32.grad, x.grad) < 1e-5 and relative_error(w32.grad, weight.grad) < 1e-5
    for padding in ((0, 1, -1, 0), (0, 1, 1.5, 0)):
        with pytest.raises(ValueError, match=r"padding \(top, bottom, left, right\) must be non-negative ints"):
            ops.conv2d(x32, w32, None, 1, padding)


def test_what_no_adapter_knows_stays_in_pytorch_with_the_reason():
    """A Conv2dSame of a dtype the kernels lack (its model still traced, not walked), one with a forward hook, a
    subclass overriding its forward, a class with its name that is no Conv2d, and a Conv2d subclass of the user's
    whose forward (data-dependent) no trace can follow."""
    class Padded(Conv2dSame):
        def forward(self, x):
            return super().forward(x) * 2

    class Impostor(nn.Module):
        def forward(self, x):
            return x

    Impostor.__module__, Impostor.__qualname__ = "timm.layers.conv2d_same", "Conv2dSame"

    class Gated(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) if x.sum() > 0 else super().forward(-x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.wide, self.hooked = Conv2dSame(3, 3, 3).double(), Conv2dSame(3, 3, 3)
            self.padded, self.impostor, self.fine = Padded(3, 3, 3), Impostor(), Conv2dSame(3, 3, 2, stride=2)

        def forward(self, x):
            y = self.wide(x.double()).float()
            return self.fine(self.impostor(self.padded(self.hooked(y))))

    torch.manual_seed(3)
    net = Net()
    net.hooked.register_forward_hook(lambda module, inputs, output: output + 1)
    x = torch.randn(1, 3, 5, 5)
    expected = net(x)
    swapped = knn.swap(net, verbose=False)
    records = _records(swapped)
    assert "(model)" not in records and records["fine"][0] == "swapped"
    assert records["wide"][0] == "kept" and "float64 not supported" in records["wide"][1]
    assert records["hooked"][0] == "kept" and "forward hooks" in records["hooked"][1]
    assert records["padded"][0] == "kept" and "overrides the forward of timm.layers.conv2d_same.Conv2dSame" in \
        records["padded"][1]
    assert records["impostor"][0] == "kept" and "is not a subclass of Conv2d" in records["impostor"][1]
    torch.testing.assert_close(swapped(x), expected, rtol=1e-4, atol=1e-5)

    walked = knn.swap(nn.Sequential(Gated(3, 3, 1), nn.Conv2d(3, 3, 1)))
    records = _records(walked)
    assert records["(model)"][0] == "walked" and records["1"][0] == "swapped"
    assert records["0"][0] == "kept" and "Gated has a forward of its own that no adapter knows" in \
        records["0"][1]


def test_find_returns_none_without_an_adapter():
    class Overrides(Conv2dSame):
        def forward(self, x):
            return super().forward(x)

    assert adapters.find(nn.Linear(2, 2)) is None and adapters.find(nn.Sequential()) is None
    assert adapters.find(Overrides(3, 3, 3)) is None
    assert adapters.find(TritonConv2dSame.from_conv(Conv2dSame(3, 3, 3))) is None  # an adapter's own module
    assert adapters.find(Conv2dSame(3, 3, 3)).product is TritonConv2dSame


def test_the_registry_is_built_in_one_place_not_by_imports(monkeypatch):
    """Built on first use from kernels.conv2d_same and kernels.attention, whatever was imported before; `register`
    adds to it (or replaces a built-in), its arguments checked by name."""
    monkeypatch.setattr(adapters, "_ADAPTERS", {})  # as in a fresh process; the real one comes back after
    assert {name: adapter.product for name, adapter in adapters.registry().items()} == {
        "timm.layers.conv2d_same.Conv2dSame": TritonConv2dSame,
        "timm.models.layers.conv2d_same.Conv2dSame": TritonConv2dSame,
        "torch.nn.modules.activation.MultiheadAttention": TritonMultiheadAttention}

    class Doubled(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    class TritonDoubled(nn.Linear):
        def forward(self, x):
            return ops.linear(x, self.weight * 2, self.bias * 2)

    name = adapters.qualified_name(Doubled)
    adapters.register(name, nn.Linear, TritonDoubled, lambda m: adapters.share(m, TritonDoubled),
                      lambda module, parent: "doubled")
    assert len(adapters.registry()) == 4 and adapters.find(Doubled(3, 2)).product is TritonDoubled
    torch.manual_seed(5)
    model = nn.Sequential(Doubled(3, 4), nn.ReLU())
    x = torch.randn(2, 3)
    expected = model(x)
    swapped = knn.swap(model)
    assert _records(swapped)["0"] == ("swapped", "doubled") and isinstance(model[0], TritonDoubled)
    torch.testing.assert_close(swapped(x), expected, rtol=1e-5, atol=1e-6)

    build, describe = TritonConv2dSame.from_conv, lambda module, parent: ""
    for arguments, error, words in [
        ((3, nn.Conv2d, TritonConv2dSame, build, describe), TypeError, "name must be a str"),
        (("Conv2dSame", nn.Conv2d, TritonConv2dSame, build, describe), ValueError, "name must be a class's fully"),
        ((name, nn.Conv2d(1, 1, 1), TritonConv2dSame, build, describe), TypeError, "base must be an nn.Module "),
        ((name, nn.Conv2d, int, build, describe), TypeError, "product must be an nn.Module subclass"),
        ((name, nn.Conv2d, TritonConv2dSame, None, describe), TypeError, "build must be callable"),
        ((name, nn.Conv2d, TritonConv2dSame, build, "detail"), TypeError, "describe must be callable"),
    ]:
        with pytest.raises(error, match=words):
            adapters.register(*arguments)


def test_a_parametrized_conv2d_same_stays_in_pytorch_and_both_models_still_run():
    """weight_norm through torch.nn.utils.parametrizations makes the conv's class parametrize's, whose `weight`
    property an adapter built from it would lose."""
    torch.manual_seed(6)
    model = _Stem()
    torch.nn.utils.parametrizations.weight_norm(model.conv)
    x = torch.randn(2, 3, 7, 6)
    expected = model(x)
    swapped = knn.swap(model)
    records = _records(swapped)
    assert records["conv"][0] == "kept" and "parametrize" in records["conv"][1] and "weight" in records["conv"][1]
    assert records["dw"][0] == "swapped" and isinstance(model.dw, TritonConv2dSame)
    torch.testing.assert_close(swapped(x), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)


def test_the_table_lists_no_empty_containers(capsys):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Sequential())
            self.skip, self.spare = nn.Sequential(), nn.ModuleList()
            self.heads = nn.ModuleList([nn.Linear(4, 4), nn.Sequential(nn.Sequential(nn.Linear(4, 2)))])
            self.extra = nn.ModuleDict({"norm": nn.LayerNorm(4), "none": nn.ModuleDict()})

        def forward(self, x):
            if x.sum() > 0:  # data-dependent: the module walk
                x = -x
            x = self.skip(self.body(x))
            return self.heads[1](self.extra["norm"](self.heads[0](x)))

    torch.manual_seed(4)
    for model in (Net(), nn.Sequential(nn.Sequential(nn.Sequential(), nn.Linear(4, 4)), nn.Sequential(), nn.ReLU())):
        x = torch.randn(3, 4)
        expected = model(x)
        swapped = knn.swap(model, verbose=True)
        table = capsys.readouterr().out
        assert "Sequential" not in table and "ModuleList" not in table and "ModuleDict" not in table, table
        torch.testing.assert_close(swapped(x), expected, rtol=1e-5, atol=1e-6)
    assert _records(swapped) == {"0.1": ("fused", "0.1 -> 2")}
