"""A BN chain's backward sums formed in the epilogue of the dgrad that forms its output's gradient
(`conv_dgrad.conv2d_input_grad_with_sums`, handed on by the fusion pass): the sums against float64, the dgrad
itself unchanged, and a swapped network that uses them matching PyTorch in float64."""

import copy

import pytest
import torch
from torch import nn

import triton_workbench.kernels.nn as knn
from triton_workbench.kernels import chains, conv_dgrad
from triton_workbench.kernels.batch_norm import ChainSums, Norm
from triton_workbench.kernels.conv_dgrad import conv2d_input_grad, conv2d_input_grad_with_sums
from triton_workbench.kernels.conv_geometry import make_geometry
from triton_workbench.workbench.torchvision_resnet import BasicBlock
from numerics import relative_error
from test_fusion import _AtenOps, _check_against_float64

_SMALL = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 4, "num_warps": 4, "num_stages": 2}


def _norm(channels: int, affine: bool = True) -> Norm:
    weight, bias = (torch.randn(channels), torch.randn(channels)) if affine else (None, None)
    return Norm(torch.randn(channels), torch.rand(channels) + 0.5, weight, bias, True)


def _expected_sums(grad: torch.Tensor, chain: ChainSums) -> list[torch.Tensor]:
    """The chain's backward sums in float64 from grad (the gradient of its output), as the BN backward forms them."""
    def per_channel(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.double()[None, :, None, None]

    def normalised(y: torch.Tensor, norm: Norm) -> tuple[torch.Tensor, torch.Tensor]:
        x_hat = (y.double() - per_channel(norm.mean)) * per_channel(norm.invstd)
        pre = x_hat * per_channel(norm.weight) + per_channel(norm.bias) if norm.weight is not None else x_hat
        return x_hat, pre

    x_hat, pre = normalised(chain.y, chain.norm)
    r_hat = None
    if chain.residual_norm is not None:
        r_hat, r_pre = normalised(chain.residual, chain.residual_norm)
        pre = pre + r_pre
    elif chain.residual is not None:
        pre = pre + chain.residual.double()
    pre = pre.detach().requires_grad_()
    activation = {"relu": torch.relu, "leaky_relu": lambda t: torch.nn.functional.leaky_relu(t, 0.2),
                  "gelu": torch.nn.functional.gelu, None: lambda t: t}[chain.activation]
    dz, = torch.autograd.grad(activation(pre), pre, grad.double())
    sums = [dz.sum((0, 2, 3)), (dz * x_hat).sum((0, 2, 3))]
    return sums + ([(dz * r_hat).sum((0, 2, 3))] if r_hat is not None else [])


@pytest.mark.device_portable
@pytest.mark.usefixtures("on_kernel_device")
@pytest.mark.parametrize("case", [
    # (n, c_in, h, w, c_out, kernel, stride, padding, residual, residual normalised, activation, channels_last,
    #  groups)
    (2, 5, 9, 7, 6, 3, 1, 1, False, False, "relu", False, 1),
    (3, 16, 9, 11, 8, 3, 2, 1, True, True, "relu", True, 1),  # stride phases of unequal rows (9 x 11)
    (2, 8, 7, 5, 4, 1, 2, 0, True, False, "leaky_relu", False, 1),  # a 1x1 downsample's phases: taps in one only
    (5, 16, 17, 15, 16, 3, 2, 1, True, True, "gelu", True, 1),
    (4, 24, 16, 16, 16, 3, 1, 1, False, False, None, True, 1),  # two channel blocks, an identity chain
    (2, 32, 9, 7, 8, 3, 2, 1, True, True, "relu", True, 2),  # two groups of 16 channels: their blocks apart
])
def test_sums_in_the_dgrad_launch_match_float64_and_leave_dx_as_it_was(case, monkeypatch):
    """Small tiles and 2-tile groups: several groups per phase, the last one short, merged by whichever tile
    finishes last; the affine-free BN too (the identity case). dx is bit for bit the plain dgrad's."""
    n, c_in, h, w, c_out, kernel, stride, padding, residual, residual_norm, activation, channels_last, groups = case
    monkeypatch.setattr(conv_dgrad, "SUM_GROUP", 2)
    torch.manual_seed(sum(case[:8]))
    layout = torch.channels_last if channels_last else torch.contiguous_format
    like = lambda: torch.randn(n, c_in, h, w).contiguous(memory_format=layout)  # noqa: E731
    chain = ChainSums(None, like(), _norm(c_in, affine=activation is not None), like() if residual else None,
                      _norm(c_in) if residual_norm else None, activation, 0.2 if activation == "leaky_relu" else 0.0)
    geometry = make_geometry((kernel, kernel), stride, padding, 1, groups)
    dz = torch.randn(n, c_out, *geometry.output_hw(h, w, kernel, kernel)).contiguous(memory_format=layout)
    weight = torch.randn(c_out, c_in // groups, kernel, kernel)
    x = torch.empty_like(chain.y)
    dx, sums = conv2d_input_grad_with_sums(dz, weight, x, geometry, chain, config=_SMALL)
    assert torch.equal(dx, conv2d_input_grad(dz, weight, x, geometry, config=_SMALL))
    for index, expected in enumerate(_expected_sums(dx, chain)):
        assert relative_error(sums[index], expected, floor=1.0) < 1e-5, index


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="ResNet-18's sizes take hours in the interpreter")
def test_resnet18_dgrads_with_sums_match_float64_on_a_gpu():
    """Every ResNet-18 dgrad but the stem's at batch 64, fp16 channels_last, default configs, with a chain of a
    normalised residual (three sums) and ReLU: hundreds of tiles race to each group's merge. dx bit for bit the
    plain dgrad's, the sums against float64 from that dx."""
    from triton_workbench.workbench.conv_bench import RESNET18_CONV_SHAPES, resnet18_problem

    device = torch.device("cuda")
    torch.manual_seed(23)
    for shape in RESNET18_CONV_SHAPES[1:]:
        problem = resnet18_problem(shape, batch=64) | {"activation": None, "bias": False}
        inputs = conv_dgrad.CONV_DGRAD_SPEC.make_inputs(problem, device)
        x = inputs["x"]
        like = lambda: torch.randn_like(x)  # noqa: E731
        with torch.device(device):
            chain = ChainSums(None, like(), _norm(x.shape[1]), like(), _norm(x.shape[1]), "relu", 0.0)
        dx, sums = conv2d_input_grad_with_sums(inputs["grad_output"], inputs["weight"], x, inputs["geometry"], chain)
        assert torch.equal(dx, conv2d_input_grad(inputs["grad_output"], inputs["weight"], x, inputs["geometry"]))
        for index, expected in enumerate(_expected_sums(dx, chain)):
            assert relative_error(sums[index], expected, floor=1.0) < 1e-4, (shape["name"], index)


def test_a_chain_laid_out_otherwise_than_x_is_refused():
    chain = ChainSums(None, torch.randn(2, 4, 5, 5), _norm(4), None, None, "relu", 0.0)
    x = torch.empty(2, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="dx's shape"):
        conv2d_input_grad_with_sums(torch.randn(2, 4, 5, 5), torch.randn(4, 4, 3, 3), x,
                                    make_geometry((3, 3), 1, 1, 1, 1), chain)


def test_the_op_passes_opcheck():
    from triton_workbench.kernels import ops

    torch.manual_seed(5)
    y, r = (torch.randn(2, 4, 6, 5).contiguous(memory_format=torch.channels_last) for _ in range(2))
    norm, r_norm = _norm(4), _norm(4)
    torch.library.opcheck(ops._input_grad_sums_op, (
        torch.randn(2, 3, 6, 5).contiguous(memory_format=torch.channels_last), torch.empty_like(y),
        torch.randn(3, 4, 3, 3), [1, 1], [1, 1], [1, 1], 1, torch.randn_like(y), y, r, norm.mean, norm.invstd,
        norm.weight, norm.bias, r_norm.mean, r_norm.invstd, r_norm.weight, r_norm.bias, "relu", 0.0))


class _TwoBlocks(nn.Module):
    """A ResNet stage boundary: an identity block, then a strided block with a downsample -- every BN chain output
    read by one conv (the second block's input by its conv1, whose downsample and nothing else read it handed on)."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.first = BasicBlock(width, width)
        self.second = BasicBlock(width, 2 * width, stride=2)  # (with its downsample)

    def forward(self, x):
        return self.second(self.first(x))


def _chain_calls(model: nn.Module) -> list:
    return [node for node in model.graph.nodes if node.target in (chains.conv_bn_act, chains.bn_act)]


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_stage_boundary_forms_every_chains_sums_in_a_dgrad_and_matches_pytorch(channels_last):
    """first.bn1, first's output (read by second.conv1 and, handed on, the downsample) and second.bn1: each chain
    hands its sums to the conv that reads it; the step runs the fused dgrad three times and matches float64 for
    three steps, then in eval (folded: no sums handed)."""
    torch.manual_seed(21)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = _TwoBlocks().to(memory_format=layout)
    swapped = knn.swap(copy.deepcopy(model))
    readers = [node for node in _chain_calls(swapped) if "x_chain" in node.kwargs]
    assert [node.args[1].target for node in readers] == ["first.conv2", "second.conv1", "second.conv2"]
    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=layout).requires_grad_()
    with _AtenOps() as ops:
        swapped(x).sum().backward()
    names = [name for name, _ in ops.ops]
    assert names.count("workbench::conv2d_input_grad_chain_sums") == 3
    _check_against_float64(model, torch.randn(2, 8, 9, 9).contiguous(memory_format=layout), steps=3)


class _ChainThenConv(nn.Module):
    """A BN chain, conv1 -> bn1 -> ReLU, whose output `reads` gives conv2 -> bn2 (and whatever else reads it)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.reads(torch.relu(self.bn1(self.conv1(x))))


def test_a_chain_read_before_its_conv_or_by_an_eval_bn_conv_keeps_its_own_sums():
    """An earlier reader of the chain's output adds to its gradient after the conv's dgrad: no hand-off. A reader
    conv whose BN is in eval mode (folded) takes no sums: the chain forms its own. Both match float64."""

    class EarlyReader(_ChainThenConv):
        def reads(self, y):
            early = y * 0.5
            return self.bn2(self.conv2(y)) + early

    torch.manual_seed(22)
    swapped = knn.swap(EarlyReader())
    assert not any("x_chain" in node.kwargs or node.kwargs.get("hand_sums") for node in _chain_calls(swapped))
    _check_against_float64(EarlyReader(), torch.randn(2, 4, 6, 5), steps=2)

    block = BasicBlock(4, 4)
    block.bn2.eval()  # bn1's reader, conv2 -> bn2, is folded: bn1's chain forms its sums itself
    swapped = knn.swap(copy.deepcopy(block))
    assert any("x_chain" in node.kwargs for node in _chain_calls(swapped))
    _check_against_float64(block, torch.randn(2, 4, 6, 5), steps=2)


def test_a_conv_reading_the_chain_twice_or_only_its_handed_input_gets_no_or_no_usable_sums():
    """A conv that reads the chain's output also as its residual takes part of the output's gradient only: no
    hand-off (a chain that crashed the forward, and would give wrong sums). A conv whose own output takes no
    gradient while its handed-on input does: the chain forms its sums itself. Both against float64."""

    class ReadTwice(_ChainThenConv):
        def reads(self, y):
            return torch.relu(self.bn2(self.conv2(y)) + y)

    class HandedOnly(_ChainThenConv):
        def reads(self, y):
            return self.bn2(self.conv2(y)), y * 2.0

    torch.manual_seed(24)
    swapped = knn.swap(ReadTwice())
    assert not any("x_chain" in node.kwargs for node in _chain_calls(swapped))
    _check_against_float64(ReadTwice(), torch.randn(2, 4, 6, 5), steps=2)

    model = HandedOnly()
    swapped = knn.swap(copy.deepcopy(model))
    assert any("x_chain" in node.kwargs for node in _chain_calls(swapped))
    x = torch.randn(2, 4, 6, 5)
    grads = []
    for net, inputs in ((swapped, x), (copy.deepcopy(model).double(), x.double())):
        inputs = inputs.requires_grad_()
        net(inputs)[1].sum().backward()  # the conv's output takes no gradient
        grads.append((inputs.grad, net.conv1.weight.grad, net.bn1.weight.grad, net.bn1.bias.grad))
    for ours, reference in zip(*grads):
        assert relative_error(ours, reference) < 2e-4


def test_the_reading_convs_backward_keeps_no_chain_tensor_alive(monkeypatch):
    """The chain's tensors are saved for the backward as tensors (saved-tensor hooks, version checks), not held
    on the conv's context: after backward, with the loss still referenced, the chain's input is freed."""
    import gc
    import weakref

    inputs = []
    original = chains.batch_norm_act_chain

    def recording(*args, **kwargs):
        out, chain = original(*args, **kwargs)
        if chain is not None:
            inputs.append(weakref.ref(chain.y))
        return out, chain

    torch.manual_seed(25)
    swapped = knn.swap(BasicBlock(4, 4))
    monkeypatch.setattr(chains, "batch_norm_act_chain", recording)
    out = swapped(torch.randn(2, 4, 6, 5, requires_grad=True))
    assert len(inputs) == 1  # bn1's chain, read by conv2
    out.sum().backward()
    gc.collect()
    assert inputs[0]() is None


def test_a_chain_of_one_position_in_channels_last_hands_its_sums_on_and_matches_pytorch():
    """A strided conv takes a channels_last 2 x 2 input to N x C x 1 x 1, which keeps channels_last strides while
    its gradient (`memory_format_of`: contiguous) gets NCHW ones: they differ on size-1 dims only (a late ResNet
    stage at a small input), where the hand-off must still fit."""
    torch.manual_seed(26)
    block = BasicBlock(4, 4, stride=2).to(memory_format=torch.channels_last)
    x = torch.randn(3, 4, 2, 2).contiguous(memory_format=torch.channels_last)
    with _AtenOps() as ops:
        knn.swap(copy.deepcopy(block))(x.clone().requires_grad_()).sum().backward()
    assert [name for name, _ in ops.ops].count("workbench::conv2d_input_grad_chain_sums") == 1
    _check_against_float64(block, x, steps=2)

