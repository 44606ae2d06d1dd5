"""The fusion pass (kernels.fusion via kernels.nn.swap): which chains it finds in real model code, and that the
rewritten model matches PyTorch computed in float64 -- outputs, every gradient, running stats -- in train and eval."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import triton_workbench.kernels.nn as knn
from triton_workbench.workbench.torchvision_resnet import BasicBlock, Bottleneck, resnet18
from numerics import relative_error


def _records(model: nn.Module) -> dict[str, tuple[str, str]]:
    return {record.path: (record.action, record.detail) for record in model.swap_records}


class _AtenOps(TorchDispatchMode):
    """Every op that runs below autograd (aten and custom ops), by name."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, int]] = []  # (op name, rank of its first argument)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append((func._schema.name, args[0].dim() if args and isinstance(args[0], torch.Tensor) else -1))
        return func(*args, **(kwargs or {}))


def _relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return relative_error(ours, reference, floor=5e-2)


def _check_against_float64(block: nn.Module, x: torch.Tensor, steps: int, tolerance: float = 2e-4) -> None:
    """Train `steps` SGD steps of the swapped block and of a float64 copy in PyTorch; compare outputs, the
    input's gradient, every parameter's, the running stats and num_batches_tracked after each, then eval
    outputs. The input needs its gradient, as a block's inside a network does (so a conv hands it on to its
    other readers, `chains.conv_bn_act(hand_on=True)`)."""
    reference = copy.deepcopy(block).double()
    swapped = knn.swap(block)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (swapped, reference)]
    generator = torch.Generator().manual_seed(3)
    for _ in range(steps):
        outputs, inputs_used = [], []
        for model, optimizer, inputs in ((swapped, optimizers[0], x), (reference, optimizers[1], x.double())):
            optimizer.zero_grad()
            inputs = inputs.detach().requires_grad_(True)
            out = model(inputs)
            if not outputs:
                grad = torch.randn(out.shape, generator=generator)
            out.backward(grad.to(out.dtype))
            outputs.append(out)
            inputs_used.append(inputs)
        assert _relative_error(*outputs) < tolerance
        assert _relative_error(*(inputs.grad for inputs in inputs_used)) < tolerance, "input gradient"
        for (name, ours), theirs in zip(swapped.named_parameters(), reference.parameters()):
            assert _relative_error(ours.grad, theirs.grad) < tolerance, name
        for (name, ours), theirs in zip(swapped.named_buffers(), reference.buffers()):
            assert _relative_error(ours, theirs) < tolerance, name  # running stats and num_batches_tracked
        for optimizer in optimizers:
            optimizer.step()
    swapped.eval(), reference.eval()
    assert _relative_error(swapped(x), reference(x.double())) < tolerance


@pytest.mark.parametrize("channels_last", [False, True])
def test_basic_block_with_downsample_fuses_everything_and_matches_pytorch(channels_last):
    torch.manual_seed(0)
    block = BasicBlock(3, 6, stride=2)
    x = torch.randn(4, 3, 7, 9)
    if channels_last:
        block, x = block.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    swapped = knn.swap(copy.deepcopy(block))
    assert _records(swapped) == {
        "conv1": ("fused", "conv1 -> bn1 -> relu"),
        "downsample.0": ("fused", "downsample.0 -> downsample.1 (normalised inside its consumer's kernel)"),
        "conv2": ("fused", "conv2 -> bn2 -> + residual (its BN fused) -> relu"),  # one ReLU module, used twice
    }
    _check_against_float64(block, x, steps=2)


@pytest.mark.parametrize("channels_last", [False, True])
def test_stem_conv_bn_relu_max_pool_fuses_and_matches_pytorch(channels_last, monkeypatch):
    """ResNet's stem (7x7 stride-2 conv -> BN -> ReLU -> 3x3 stride-2 max-pool) on odd sizes: the pool in the BN
    kernel in training (the conv folded with BN and PyTorch's pool in eval); outputs, gradients, running stats.
    In channels_last the kernels compute with 4 channels: the wgrad reads the forward's padded x."""
    from triton_workbench.kernels import conv_fwd, conv_wgrad

    padded = {"forward": [], "wgrad": []}  # the 3-channel tensors each pads
    for module, name in ((conv_fwd, "forward"), (conv_wgrad, "wgrad")):
        monkeypatch.setattr(module, "pad_channels", lambda t, channels, pad=module.pad_channels, name=name: (
            padded[name].append(t.shape[1]) if t.shape[1] < channels else None) or pad(t, channels))
    torch.manual_seed(7)
    stem = nn.Sequential(nn.Conv2d(3, 5, 7, 2, 3, bias=False), nn.BatchNorm2d(5), nn.ReLU(inplace=True),
                         nn.MaxPool2d(3, 2, 1))
    x = torch.randn(3, 3, 19, 17)
    if channels_last:
        stem, x = stem.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    assert _records(knn.swap(copy.deepcopy(stem))) == {"0": ("fused", "0 -> 1 -> 2 -> 3")}
    _check_against_float64(stem, x, steps=2)
    # x and the weight in each forward (two steps, then eval), never again in a wgrad
    assert padded == {"forward": [3, 3] * 3 if channels_last else [], "wgrad": []}


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_classifier_head_averages_in_the_bn_kernel_and_matches_pytorch(channels_last):
    """... -> BN -> + residual -> ReLU -> AdaptiveAvgPool2d(1): the average in the normalise kernel (the block's
    output never stored; its backward spreads the pooled gradient), with and without a residual; eval folds the
    conv and pools in PyTorch. Odd sizes, against float64; a pool to 2 x 2 stays in PyTorch."""
    torch.manual_seed(28)
    heads = {"0.conv2 -> 0.bn2 -> + residual -> 0.relu -> 1": (
        nn.Sequential(BasicBlock(4, 4), nn.AdaptiveAvgPool2d(1), nn.Flatten()), torch.randn(3, 4, 7, 5)),
        "0.conv2 -> 0.bn2 -> + residual (its BN fused) -> 0.relu -> 1": (  # the downsample's BN: three sums
        nn.Sequential(BasicBlock(4, 6, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten()), torch.randn(3, 4, 9, 7)),
        "0 -> 1 -> 2 -> 3": (nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                           nn.AdaptiveAvgPool2d((1, 1))), torch.randn(3, 3, 7, 5)),
        "0 -> 1 -> 2": (nn.Sequential(nn.BatchNorm2d(3), nn.ReLU6(), nn.AdaptiveAvgPool2d(1)),  # BN alone: eval too
                        torch.randn(3, 3, 7, 5) * 4)}
    for chain, (head, x) in heads.items():
        if channels_last:
            head, x = head.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        records = knn.swap(copy.deepcopy(head)).swap_records
        assert chain in [r.detail for r in records]
        assert not [r for r in records if r.action == "kept" and r.module != "Flatten"]
        _check_against_float64(head, x, steps=2)
    hooked = nn.AdaptiveAvgPool2d(1)
    hooked.register_forward_hook(lambda module, args, out: None)
    for pool in (nn.AdaptiveAvgPool2d(2), hooked):  # another size; a hook the fused kernel would skip
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), pool)
        assert [r.module for r in knn.swap(model).swap_records if r.action == "kept"] == ["AdaptiveAvgPool2d"]


def test_max_pools_the_kernel_does_not_take_stay_in_pytorch():
    """ceil mode, returned indices, forward hooks, a window given as PyTorch takes it but `MaxPool` does not, or
    an activation read again: the BN chain ends at its activation and the pool runs in PyTorch, with why."""
    hooked = nn.MaxPool2d(2)
    hooked.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    calls = []
    for pool, why in ((nn.MaxPool2d(3, 2, 1, ceil_mode=True), "ceil mode"),
                      (nn.MaxPool2d(2, return_indices=True), "returns indices"), (hooked, "hooks"),
                      (nn.MaxPool2d(3, stride=()), "do not take")):
        model = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), pool)
        swapped = knn.swap(copy.deepcopy(model))
        assert _records(swapped)["0"] == ("fused", "0 -> 1"), pool
        assert why in _records(swapped)["2"][1] and _records(swapped)["2"][0] == "kept"
        x = torch.randn(2, 4, 7, 7)
        torch.testing.assert_close(swapped(x), model(x), rtol=1e-4, atol=1e-5)
    assert len(calls) == 2  # the hooked pool ran, its hook called, in the swapped model as in the original
    assert _records(knn.swap(nn.Sequential(nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d((3,), 2, 1))))["0"] == \
        ("fused", "0 -> 1 -> 2")  # a 1-tuple window is PyTorch's (3, 3)

    class ReadTwice(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.pool = nn.BatchNorm2d(4), nn.MaxPool2d(2)

        def forward(self, x):
            a = torch.relu(self.bn(x))
            return self.pool(a), a

    assert _records(knn.swap(ReadTwice()))["bn"] == ("fused", "bn -> relu")


def test_bottleneck_and_identity_shortcut_match_pytorch():
    torch.manual_seed(1)
    block = nn.Sequential(Bottleneck(8, 2), BasicBlock(8, 8))  # identity shortcuts: a plain residual add
    x = torch.randn(3, 8, 5, 6)
    _check_against_float64(block, x, steps=2)


def test_inverted_residual_with_a_depthwise_conv_matches_pytorch():
    """MobileNetV2's block: 1x1 expand, 3x3 depthwise (its own direct kernel), 1x1 project, each with BN."""
    class InvertedResidual(nn.Module):
        def __init__(self, channels: int, expand: int):
            super().__init__()
            hidden = channels * expand
            self.expand = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU())
            self.depthwise = nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
                                           nn.BatchNorm2d(hidden), nn.ReLU())
            self.project = nn.Sequential(nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels))

        def forward(self, x):
            return x + self.project(self.depthwise(self.expand(x)))

    torch.manual_seed(9)
    block = InvertedResidual(4, 3)
    swapped = knn.swap(copy.deepcopy(block))
    assert _records(swapped)["depthwise.0"] == ("fused", "depthwise.0 -> depthwise.1 -> depthwise.2")
    _check_against_float64(block, torch.randn(2, 4, 5, 6).contiguous(memory_format=torch.channels_last), steps=2)


def test_batch_norm_variants_match_pytorch():
    """momentum=None (cumulative average), affine=False, track_running_stats=False, another eps, BN -> act."""
    torch.manual_seed(2)
    block = nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5, momentum=None, eps=1e-3), nn.SiLU(),
        nn.Conv2d(5, 4, 1, bias=False), nn.BatchNorm2d(4, affine=False), nn.GELU(),
        nn.BatchNorm2d(4, track_running_stats=False), nn.LeakyReLU(0.2),
    )
    _check_against_float64(block, torch.randn(2, 3, 5, 5), steps=3)


def test_functional_calls_shared_modules_and_in_place_ops_are_found():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
            self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
            self.conv3 = nn.Conv2d(4, 4, 1)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = torch.add(self.bn2(self.conv2(out)), x).relu_()
            out = torch.sigmoid(self.conv3(out))
            return F.gelu(self.fc(out.mean((2, 3))), approximate="tanh")

    torch.manual_seed(4)
    block = Block()
    swapped = knn.swap(copy.deepcopy(block))
    assert _records(swapped) == {
        "conv1": ("fused", "conv1 -> bn1 -> relu"),
        "conv2": ("fused", "conv2 -> bn2 -> + residual -> .relu_()"),
        "conv3": ("fused", "conv3 -> sigmoid"),
        "fc": ("fused", "fc -> gelu"),
    }
    _check_against_float64(block, torch.randn(2, 4, 5, 5), steps=1)


def test_an_in_place_activation_on_a_tensor_read_elsewhere_is_left_in_pytorch():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(2)

        def forward(self, x):
            y = self.bn(x)
            z = y.relu_()  # mutates y, which the return also reads
            return y + z

    block = Block()
    x = torch.randn(2, 2, 3, 3)
    expected = copy.deepcopy(block)(x)
    swapped = knn.swap(block)
    assert _records(swapped)["relu_"] == ("kept", "in place on a tensor something else also reads")
    torch.testing.assert_close(swapped(x), expected, rtol=1e-4, atol=1e-5)


def test_swapped_resnet_training_step_runs_no_pytorch_batch_norm_relu_or_add():
    """Forward and backward: BatchNorm, ReLU and the residual adds (and their gradients) in Triton ops only."""
    torch.manual_seed(5)
    model = knn.swap(resnet18(num_classes=3, width=4))
    assert not [r for r in model.swap_records if r.action == "kept"]
    details = [r.detail for r in model.swap_records]
    assert "conv1 -> bn1 -> relu -> maxpool" in details  # the stem: pooled too, and the head averaged
    assert "layer4.1.conv2 -> layer4.1.bn2 -> + residual -> layer4.1.relu -> avgpool" in details
    with _AtenOps() as seen:
        model(torch.randn(2, 3, 16, 16, requires_grad=True)).sum().backward()
    names = {name for name, _ in seen.ops}
    assert {name for name in names if "batch_norm" in name or "relu" in name or "pool" in name
            or "threshold" in name} <= {
        "workbench::batch_norm_stats", "workbench::batch_norm_act", "workbench::batch_norm_act_max_pool",
        "workbench::batch_norm_act_average", "workbench::batch_norm_act_backward"}
    assert "workbench::batch_norm_act_average" in names and not names & {"aten::mean", "aten::adaptive_avg_pool2d"}
    assert not [rank for name, rank in seen.ops if name.startswith("aten::add") and rank == 4]  # only the counters'



def test_checkpoints_load_both_ways_and_optimizers_keep_working():
    torch.manual_seed(6)
    original = BasicBlock(2, 4, stride=2)
    parameters = list(original.parameters())
    optimizer = torch.optim.SGD(original.parameters(), lr=0.1, momentum=0.9)
    swapped = knn.swap(original)
    assert list(swapped.state_dict()) == list(original.state_dict())
    assert all(a is b for a, b in zip(swapped.parameters(), parameters))
    assert swapped.bn1.running_mean is original.bn1.running_mean  # buffers updated in place
    swapped(torch.randn(3, 2, 5, 5)).sum().backward()
    optimizer.step()  # built before the swap: updates the swapped model's parameters
    assert swapped.bn1.num_batches_tracked.item() == 1 and original.bn1.running_var.ne(1).any()
    fresh = BasicBlock(2, 4, stride=2)
    fresh.load_state_dict(swapped.state_dict())
    again = knn.swap(BasicBlock(2, 4, stride=2))
    again.load_state_dict(fresh.state_dict())
    x = torch.randn(2, 2, 5, 5)
    torch.testing.assert_close(again.eval()(x), fresh.eval()(x), rtol=1e-4, atol=1e-5)


def test_eval_folds_the_current_running_stats_every_call():
    torch.manual_seed(7)
    block = knn.swap(BasicBlock(3, 3)).eval()
    x = torch.randn(2, 3, 4, 4)
    block(x)
    block.bn1.running_mean.add_(0.5)  # a later change of the stats must show in the next call
    plain = BasicBlock(3, 3).eval()
    plain.load_state_dict(block.state_dict())
    torch.testing.assert_close(block(x), plain(x), rtol=1e-4, atol=1e-5)


def test_untraceable_model_falls_back_to_the_module_walk_and_says_so(capsys):
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 3 * 3, 2), nn.Tanh())

        def forward(self, x):
            y = self.features(x)
            if y.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                y = y * 2
            return self.head(y)

    torch.manual_seed(8)
    model = DataDependent()
    x = torch.randn(2, 3, 5, 5)
    expected = copy.deepcopy(model)(x)
    swapped = knn.swap(model, verbose=True)
    assert swapped is model and isinstance(model.features, torch.fx.GraphModule)
    records = _records(model)
    assert records["(model)"][0] == "walked" and "torch.fx cannot trace it" in records["(model)"][1]
    assert records["features.0"] == ("fused", "0 -> 1 -> 2") and records["head.1"] == ("fused", "1 -> 2")
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    assert "walked" in capsys.readouterr().out


def test_batch_norm_rejects_a_single_value_per_channel_in_training():
    model = knn.swap(nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        model(torch.randn(1, 2, 1, 1))
    model.eval()
    assert model(torch.randn(1, 2, 1, 1)).shape == (1, 3, 1, 1)  # running stats: fine


def test_swapped_model_runs_under_fake_tensors_and_counts_the_same_flops():
    """Shapes-only runs (FakeTensorMode, FlopCounterMode), as torch.compile and FLOP counting use them."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(10)
    eager = resnet18(num_classes=10, width=8)
    counts = []
    for model in (copy.deepcopy(eager), knn.swap(copy.deepcopy(eager))):
        with FakeTensorMode(allow_non_fake_inputs=True), FlopCounterMode(display=False) as counter:
            out = model(torch.randn(2, 3, 32, 32))
            out.sum().backward()
        assert out.shape == (2, 10)
        counts.append(counter.get_total_flops())
    assert counts[0] > 0 and counts[1] == counts[0]


def test_code_reading_self_training_or_skipped_hooks_keeps_its_module_whole():
    """A forward that reads self.training, and forward hooks (weight_norm's among them), would be frozen or
    skipped by one traced graph: such a module is walked instead, and the model still matches PyTorch."""
    class DropoutBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

        def forward(self, x):
            return F.dropout(torch.relu(self.bn(self.conv(x))), 0.5, self.training)

    torch.manual_seed(12)
    model = nn.Sequential(DropoutBlock(), nn.Conv2d(4, 4, 1))
    swapped = knn.swap(model)
    assert _records(swapped)["(model)"][0] == "walked" and "self.training" in _records(swapped)["(model)"][1]
    swapped.eval()
    x = torch.randn(2, 3, 5, 5)
    reference = copy.deepcopy(model).eval()
    torch.testing.assert_close(swapped(x), reference(x), rtol=1e-4, atol=1e-5)  # no dropout in eval

    normed = nn.Sequential(nn.utils.weight_norm(nn.Conv2d(3, 4, 3)), nn.ReLU())
    swapped = knn.swap(normed)
    assert _records(swapped)["0"] == ("kept", "it has forward hooks, which a fused kernel would not run")
    with torch.no_grad():
        normed[0].weight_v.mul_(2)  # the hook recomputes weight from weight_v at every call
    conv = normed[0]
    weight = conv.weight_g * conv.weight_v / conv.weight_v.pow(2).sum((1, 2, 3), keepdim=True).sqrt()
    torch.testing.assert_close(swapped(x), torch.relu(F.conv2d(x, weight, conv.bias)), rtol=1e-4, atol=1e-5)


def test_a_broadcast_add_after_batch_norm_runs_as_pytorch_adds():
    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
            self.shift = nn.Parameter(torch.randn(1, 4, 1, 1))

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)) + self.shift)  # not a residual: it broadcasts

    torch.manual_seed(13)
    _check_against_float64(Shifted(), torch.randn(2, 3, 5, 5), steps=1)


def test_in_place_residual_add_keeps_the_blocks_dtype_under_autocast():
    """`out.add_(x)` keeps out's dtype (fp16 under autocast, with an fp32 x) where `out + x` promotes (fp32):
    the fused block returns what eager PyTorch returns, in train and eval. (torch.fx records `out += x` as
    `out + x`, so a traced graph promotes there, and so does the swapped model.)"""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

        def forward(self, x):
            return torch.relu(self.bn(self.conv(x)).add_(x))

    torch.manual_seed(14)
    block = Block()
    swapped = knn.swap(copy.deepcopy(block))
    assert _records(swapped)["conv"] == ("fused", "conv -> bn -> + residual -> relu")
    x = torch.randn(2, 4, 5, 5)
    for mode in ("train", "eval"):
        getattr(block, mode)(), getattr(swapped, mode)()
        with torch.autocast("cpu", dtype=torch.float16):
            expected = block(x)
            out = swapped(x)
        assert out.dtype == expected.dtype == torch.float16
        torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)


def test_conv1d_and_subclasses_that_keep_their_parents_forward_are_swapped():
    """A Conv1d runs as a 2-D conv of unit height; a subclass that only adds attributes (PyTorch's own
    NonDynamicallyQuantizableLinear) is its parent to the kernels; one that overrides forward (as timm's
    Conv2dSame pads first) is traced through, and the F.conv2d its forward calls runs on the kernels."""
    class Padded(nn.Conv2d):
        def forward(self, x):
            return super().forward(F.pad(x, (0, 1, 0, 1)))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1d = nn.Conv1d(3, 4, 3, stride=2, padding=1, dilation=1)
            self.reflect = nn.Conv1d(4, 4, 3, padding=1, padding_mode="reflect")
            self.padded = Padded(1, 2, 2)
            self.proj = nn.modules.linear.NonDynamicallyQuantizableLinear(8, 5)

        def forward(self, x):
            y = self.reflect(F.gelu(self.conv1d(x)))  # [N, 4, 4]
            z = self.padded(y.unsqueeze(1))  # [N, 2, 4, 4]
            return self.proj(z.flatten(2).mean(1).flatten(1)[:, :8])

    torch.manual_seed(15)
    net = Net()
    swapped = knn.swap(copy.deepcopy(net))
    records = _records(swapped)
    assert records["conv1d"] == ("fused", "conv1d -> gelu") and records["proj"] == ("swapped", "proj")
    assert records["reflect"][0] == "kept" and "reflect" in records["reflect"][1]
    # traced through: its F.pad stays a PyTorch call, its F.conv2d runs on the kernels
    assert "padded" not in records and records["conv2d"] == ("swapped", "conv2d on the Triton kernels")
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(swapped(x), net(x), rtol=1e-4, atol=1e-5)


def test_tensors_made_in_forward_are_traced_and_stay_off_the_model():
    """torch.fx stows a tensor made in forward on the traced module under a fresh name (`_tensor_constant0`, then
    `_tensor_constant1` when traced again): the check for self.training compares it by value, not by name, and the
    GraphModule keeps it (out of its state_dict). One that does depend on self.training is still caught."""
    class Picked(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return torch.relu(self.fc(x))[:, torch.tensor([0, 2])] * torch.tensor(0.5)

    class ScaledInTraining(Picked):
        def forward(self, x):
            return torch.relu(self.fc(x)) * torch.tensor(0.5 if self.training else 1.0)

    torch.manual_seed(16)
    model, x = Picked(), torch.randn(3, 4)
    expected = model(x)
    swapped = knn.swap(model)
    assert _records(swapped) == {"fc": ("fused", "fc -> relu")}  # traced, not walked
    assert isinstance(swapped, torch.fx.GraphModule)
    assert not [name for name in vars(model) if name.startswith("_tensor_constant")]
    assert list(swapped.state_dict()) == list(model.state_dict())
    torch.testing.assert_close(swapped(x), expected, rtol=1e-4, atol=1e-5)

    swapped = knn.swap(ScaledInTraining())
    assert _records(swapped)["(model)"][0] == "walked" and "self.training" in _records(swapped)["(model)"][1]


def test_conv_matmul_norm_and_activation_calls_left_in_pytorch_get_a_row_with_a_readable_name():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.wt = nn.Parameter(torch.randn(4, 4, 1)), nn.Parameter(torch.randn(4, 4, 1, 1))
            self.bn, self.alpha = nn.BatchNorm1d(4), nn.Parameter(torch.full((1,), 0.2))

        def forward(self, x):  # x: [N, 4, L]
            y = F.conv1d(x, self.w1)
            y = F.batch_norm(y, self.bn.running_mean, self.bn.running_var, training=False)
            y = F.prelu(F.layer_norm(y, (y.shape[-1],)), self.alpha)
            z = F.conv_transpose2d(y.unsqueeze(-1), self.wt).squeeze(-1)
            z = torch.cat([z, y], 1).permute(0, 2, 1).reshape(x.shape[0], -1, 8) * 2 + 1
            out = torch.matmul(z, torch.ones(8, 8)).view(x.shape[0], -1)
            out = out.relu_() + F.hardtanh(out) + out  # kept: in place on `out`, read after; bounds (-1, 1)
            return out

    torch.manual_seed(17)
    model, x = Functional().eval(), torch.randn(2, 4, 3)
    expected = model(x)
    swapped = knn.swap(model)
    rows = {r.path: (r.module, r.action, r.detail) for r in swapped.swap_records}
    assert rows["conv1d"] == ("F.conv1d", "kept", "F.conv1d is not rewritten; nn.Conv1d is")
    assert rows["conv_transpose2d"] == ("F.conv_transpose2d", "kept",
                                        "F.conv_transpose2d is not rewritten; nn.ConvTranspose2d is")
    assert rows["batch_norm"] == ("F.batch_norm", "kept", "F.batch_norm is not rewritten; nn.BatchNorm2d is")
    assert rows["prelu"] == ("F.prelu", "kept", "F.prelu is not rewritten; nn.PReLU is")
    assert rows["layer_norm"] == ("F.layer_norm", "kept", "no Triton kernel for F.layer_norm")
    assert rows["matmul"][:2] == ("torch.matmul", "kept") and "nn.Linear" in rows["matmul"][2]
    assert rows["relu_"][:2] == ("Tensor.relu_", "kept") and rows["hardtanh"][:2] == ("F.hardtanh", "kept")
    assert set(rows) == {"conv1d", "conv_transpose2d", "batch_norm", "prelu", "layer_norm", "matmul", "relu_",
                         "hardtanh"}  # no row for cat, permute, reshape, mul, add, view, unsqueeze, ...
    torch.testing.assert_close(swapped(x), expected)

    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3).double()

        def forward(self, x):
            return torch.sigmoid(F.hardtanh(self.fc(x), -2.0, 2.0))

    rows = {r.path: (r.module, r.action, r.detail) for r in knn.swap(Gate()).swap_records}
    assert rows["sigmoid"] == ("torch.sigmoid", "kept", "follows hardtanh, left in PyTorch")


def test_readers_after_a_conv_read_the_input_it_hands_on_and_readers_before_it_keep_theirs():
    """x read before its conv -> BN -> ReLU chain keeps x; the two readers after it read the x the chain hands
    on (getitem 1 of its call), so their gradient reaches the conv's dgrad; x's gradient matches float64."""
    import operator
    from triton_workbench.kernels import chains

    class Reads(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.relu = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU()

        def forward(self, x):
            early = x * 2.0
            y = self.relu(self.bn(self.conv(x)))
            return y + x + x * 0.5 + early

    torch.manual_seed(17)
    swapped = knn.swap(Reads())
    nodes = list(swapped.graph.nodes)
    chain = next(node for node in nodes if node.target is chains.conv_bn_act)
    placeholder = next(node for node in nodes if node.op == "placeholder")
    assert chain.kwargs.get("hand_on") is True
    handed = next(user for user in chain.users if user.target is operator.getitem and user.args[1] == 1)
    later = {user for user in handed.users}
    assert len(later) == 2 and all(nodes.index(user) > nodes.index(chain) for user in later)
    assert {user for user in placeholder.users} == {chain, next(node for node in nodes if node.name == "mul")}
    _check_against_float64(Reads(), torch.randn(2, 3, 5, 4), steps=2)
