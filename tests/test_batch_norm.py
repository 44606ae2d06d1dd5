"""The BatchNorm kernels and ops against torch.nn.BatchNorm2d computed in float64: odd shapes, both memory
formats, fp16, NaN and inf, and the custom ops' opcheck."""

import copy

import pytest
import torch
from torch import nn

from triton_workbench.kernels import batch_norm_ops
from triton_workbench.kernels.batch_norm_ops import batch_norm_act

pytestmark = [pytest.mark.usefixtures("on_kernel_device"), pytest.mark.device_portable]  # CUDA tensors on a GPU


def _pair(channels: int, **options) -> tuple[nn.BatchNorm2d, nn.BatchNorm2d]:
    """(the BN our kernels run, the same BN in float64 for PyTorch), random affine parameters."""
    ours = nn.BatchNorm2d(channels, **options)
    if ours.affine:
        ours.weight.data.uniform_(0.5, 1.5)
        ours.bias.data.normal_()
    reference = nn.BatchNorm2d(channels, **options).double()
    reference.load_state_dict(ours.state_dict())
    return ours, reference


@pytest.mark.parametrize("shape", [(3, 5, 7, 6), (1, 70, 3, 1), (2, 1, 1, 9), (5, 3, 33, 35)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_train_forward_backward_and_running_stats_match(shape, layout):
    torch.manual_seed(0)
    ours, reference = _pair(shape[1], momentum=0.3)
    y = (torch.randn(shape) * 3 + 2).contiguous(memory_format=layout).requires_grad_()
    r = torch.randn(shape).contiguous(memory_format=layout).requires_grad_()
    y64, r64 = (t.detach().double().requires_grad_() for t in (y, r))
    out = batch_norm_act(y, ours, r, activation="gelu")
    expected = torch.nn.functional.gelu(reference(y64) + r64)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    assert out.stride() == y.stride()
    grad = torch.randn(shape)
    out.backward(grad)
    expected.backward(grad.double())
    for ours_grad, wanted in ((y.grad, y64.grad), (r.grad, r64.grad), (ours.weight.grad, reference.weight.grad),
                              (ours.bias.grad, reference.bias.grad)):
        torch.testing.assert_close(ours_grad.double(), wanted, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.running_mean.double(), reference.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.running_var.double(), reference.running_var, rtol=1e-5, atol=1e-6)


def test_fp16_input_with_fp32_parameters_as_autocast_gives_them():
    torch.manual_seed(1)
    ours, reference = _pair(6)
    y = torch.randn(4, 6, 5, 5).half()
    out = batch_norm_act(y, ours, activation="relu")
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), torch.relu(reference(y.double())), rtol=2e-3, atol=2e-3)


def test_nan_and_inf_reach_their_channel_only_as_in_pytorch():
    ours, reference = _pair(3)
    y = torch.randn(2, 3, 4, 4)
    y[0, 1, 2, 2] = float("nan")
    y[1, 2, 0, 0] = float("inf")
    out = batch_norm_act(y, ours, activation="relu")
    expected = torch.relu(reference(y.double()))
    assert torch.equal(out.isnan(), expected.isnan())
    torch.testing.assert_close(out[:, 0].double(), expected[:, 0], rtol=1e-5, atol=1e-5)
    assert ours.running_mean[1].isnan() and reference.running_mean[1].isnan()


def test_a_strided_input_and_residual_of_other_layout_are_handled():
    torch.manual_seed(2)
    ours, reference = _pair(4)
    y = torch.randn(2, 4, 6, 10)[..., ::2]  # W not dense: copied to the rows view
    r = torch.randn(2, 4, 6, 5).contiguous(memory_format=torch.channels_last)
    out = batch_norm_act(y, ours, r, activation="silu")
    torch.testing.assert_close(out.double(), torch.nn.functional.silu(reference(y.double()) + r.double()),
                               rtol=1e-5, atol=1e-5)


def test_bad_input_gets_a_clear_error():
    ours, _ = _pair(4)
    with pytest.raises(ValueError, match="4-D input with 4 channels"):
        batch_norm_act(torch.randn(2, 3, 4, 4), ours)
    with pytest.raises(ValueError, match="residual has shape"):
        batch_norm_act(torch.randn(2, 4, 4, 4), ours, torch.randn(2, 4, 4, 3))


def test_ops_pass_opcheck():
    torch.manual_seed(3)
    y = torch.randn(3, 4, 5, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    r = torch.randn(3, 4, 5, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight, bias = torch.rand(4, requires_grad=True) + 0.5, torch.randn(4, requires_grad=True)
    mean, invstd = batch_norm_ops._stats_op(y.detach(), None, None, None, 0.1, 1e-5)
    r_mean, r_invstd = batch_norm_ops._stats_op(r.detach(), None, None, None, 0.1, 1e-5)
    torch.library.opcheck(batch_norm_ops._stats_op, (y.detach(), torch.zeros(4), torch.ones(4), None, 0.1, 1e-5))
    torch.library.opcheck(batch_norm_ops._normalize_op, (y, mean, invstd, weight, bias, True, r, r_mean, r_invstd,
                                                         None, None, True, "relu", 0.01, True))
    torch.library.opcheck(batch_norm_ops._normalize_op, (y, mean, invstd, None, None, False, None, None, None,
                                                         None, None, False, None, 0.01, False))
    torch.library.opcheck(batch_norm_ops._normalize_average_op, (y, mean, invstd, weight, bias, True, r, r_mean,
                                                                 r_invstd, None, None, True, "relu", 0.01))
    torch.library.opcheck(batch_norm_ops._normalize_average_op, (y, mean, invstd, None, None, False, None, None,
                                                                 None, None, None, False, "gelu", 0.01))


def test_strips_whose_last_rows_run_out_still_give_exact_moments(monkeypatch):
    """A short last strip (rows not a multiple of the strip), and strips longer than the tensor (a depthwise
    conv's few output rows against 32-row strips): every row counted once, none beyond the end."""
    from triton_workbench.kernels import batch_norm

    torch.manual_seed(4)
    monkeypatch.setattr(batch_norm, "MAX_STRIPS", 2)
    for shape, strip in (((1, 3, 19, 27), None), ((2, 8, 2, 2), 32), ((3, 5, 7, 1), 32)):
        y = (torch.randn(shape) * 3 + 5).contiguous(memory_format=torch.channels_last)
        mean, invstd = batch_norm.finalize(batch_norm.moments_of(y, strip), batch_norm.Running(None, None, None, 0.1,
                                                                                               1e-5))
        torch.testing.assert_close(mean.double(), y.double().mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
        variance = y.double().var((0, 2, 3), unbiased=False)
        torch.testing.assert_close(invstd.double(), torch.rsqrt(variance + 1e-5), rtol=1e-4, atol=1e-5)


def test_backward_sums_of_more_strips_than_one_merge_load_holds():
    """The backward's per-strip sums are merged by the last strip of each channel block, SUM_ROWS strips at a
    time: 73 strips of 64 rows against 32-strip loads (three, the last partly masked), two channel blocks, a
    residual with its own BN (three sums): every gradient against float64."""
    from triton_workbench.kernels import batch_norm

    torch.manual_seed(8)
    shape = (4, 70, 33, 35)
    y = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    view = batch_norm.rows_view(y)
    assert view.strips(batch_norm.BACKWARD_STRIPS)[1] == 73 > 2 * batch_norm.SUM_ROWS.value
    assert view.channel_blocks == 2
    ours, reference = _pair(70)
    ours_r, reference_r = _pair(70)
    r = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    y, r = y.requires_grad_(), r.requires_grad_()
    y64, r64 = (t.detach().double().requires_grad_() for t in (y, r))
    out = batch_norm_act(y, ours, r, ours_r, activation="relu")
    expected = torch.relu(reference(y64) + reference_r(r64))
    grad = torch.randn(shape)
    out.backward(grad)
    expected.backward(grad.double())
    for ours_grad, wanted in ((y.grad, y64.grad), (r.grad, r64.grad), (ours.weight.grad, reference.weight.grad),
                              (ours_r.weight.grad, reference_r.weight.grad), (ours_r.bias.grad, reference_r.bias.grad)):
        torch.testing.assert_close(ours_grad.double(), wanted, rtol=1e-4, atol=1e-4)


def test_an_empty_batch_is_counted_and_leaves_the_running_stats_as_pytorch_does():
    """Batch statistics of no rows, from the statistics pass and from a conv's launch: num_batches_tracked
    counts the batch, the running stats stay, the output is empty, and the backward gives empty input and zero
    parameter gradients -- as torch.nn.BatchNorm2d."""
    from triton_workbench.kernels import chains

    for conv in (None, nn.Conv2d(2, 3, 3, padding=1, bias=False)):
        reference = nn.BatchNorm2d(3, momentum=None)
        reference.running_mean.fill_(1), reference.running_var.fill_(2)
        ours = copy.deepcopy(reference)
        x = torch.randn(0, 3 if conv is None else 2, 4, 4, requires_grad=True)
        out = chains.bn_act(x, ours, activation="relu") if conv is None else chains.conv_bn_act(x, conv, ours)
        expected = reference(x if conv is None else conv(x))
        assert out.shape == expected.shape
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(getattr(ours, name), getattr(reference, name)), name
        out.sum().backward()
        assert x.grad.shape == x.shape
        expected.sum().backward()
        for name in ("weight", "bias"):
            assert torch.equal(getattr(ours, name).grad, getattr(reference, name).grad), name


# ---------------------------------------------------------------------------------------------
# BN -> activation -> max-pool in one kernel each way (ResNet's stem)

POOLS = [((3, 3), (2, 2), (1, 1), (1, 1)),  # ResNet's stem
         ((2, 3), (1, 2), (1, 0), (1, 1)), ((3, 2), (2, 1), (1, 1), (2, 1))]


@pytest.mark.parametrize("pool", POOLS, ids=["stem", "rect", "dilated"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("training", [True, False])
def test_bn_act_max_pool_matches_pytorch(pool, layout, training):
    """pool(act(bn(y))) and every gradient against PyTorch in float64; y takes few distinct values, so windows
    hold tied maxima and the gradient must reach the first of them, as in PyTorch; running stats updated."""
    torch.manual_seed(POOLS.index(pool) * 2 + training)
    ours, reference = _pair(5, momentum=0.2)
    ours.train(training), reference.train(training)
    y = torch.randint(-3, 4, (3, 5, 11, 9)).float().contiguous(memory_format=layout).requires_grad_()
    y64 = y.detach().double().requires_grad_()
    window = batch_norm_ops.MaxPool(*pool)
    out = batch_norm_act(y, ours, activation="leaky_relu", negative_slope=0.1, pool=window)
    expected = torch.nn.functional.max_pool2d(torch.nn.functional.leaky_relu(reference(y64), 0.1), *pool)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    assert out.is_contiguous(memory_format=layout)
    grad = torch.randn(expected.shape)
    out.backward(grad)
    expected.backward(grad.double())
    for ours_grad, wanted in ((y.grad, y64.grad), (ours.weight.grad, reference.weight.grad),
                              (ours.bias.grad, reference.bias.grad)):
        torch.testing.assert_close(ours_grad.double(), wanted, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.running_mean.double(), reference.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.running_var.double(), reference.running_var, rtol=1e-5, atol=1e-6)


def test_bn_act_max_pool_nan_wins_its_windows_and_takes_their_gradient():
    """Running statistics keep a NaN in its place: every window holding it pools to NaN, and the gradient of
    those windows goes to it (PyTorch's rule: a NaN beats any number; fp16 output). A border window of -inf
    sends its gradient to its first tap inside the input, as PyTorch does."""
    ours, reference = _pair(2)
    ours.eval(), reference.eval()
    y = torch.randn(1, 2, 6, 6)
    y[0, 1, 2, 3] = float("nan")
    y[0, 0, :2, :2] = float("-inf")  # the whole of window (0, 0) inside the input
    y = y.half().requires_grad_()
    y64 = y.detach().double().requires_grad_()
    out = batch_norm_act(y, ours, activation="leaky_relu", pool=batch_norm_ops.MaxPool(*POOLS[0]))
    expected = torch.nn.functional.max_pool2d(torch.nn.functional.leaky_relu(reference(y64)), *POOLS[0])
    assert torch.equal(out.isnan(), expected.isnan()) and out.isnan().sum() == 2  # its two windows
    torch.testing.assert_close(out.double(), expected, rtol=2e-3, atol=2e-3, equal_nan=True)
    grad = torch.randn(expected.shape)
    out.backward(grad.half())
    expected.backward(grad.double())
    assert torch.equal(y.grad.isnan(), y64.grad.isnan()) and y64.grad[0, 0, 0, 0] != 0
    torch.testing.assert_close(y.grad.double(), y64.grad, rtol=2e-3, atol=2e-3, equal_nan=True)


def test_max_pool_op_passes_opcheck_and_bad_pools_are_refused():
    torch.manual_seed(4)
    y = torch.randn(2, 3, 7, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight, bias = torch.rand(3, requires_grad=True) + 0.5, torch.randn(3, requires_grad=True)
    mean, invstd = batch_norm_ops._stats_op(y.detach(), None, None, None, 0.1, 1e-5)
    torch.library.opcheck(batch_norm_ops._normalize_max_pool_op,
                          (y, mean, invstd, weight, bias, True, "relu", 0.01, batch_norm_ops.MaxPool(*POOLS[0]).arguments()))
    with pytest.raises(ValueError, match="padding"):
        batch_norm_ops.MaxPool((3, 3), (2, 2), (2, 2), (1, 1))
    with pytest.raises(ValueError, match="too small"):  # PyTorch refuses an empty output too
        batch_norm_act(y.detach()[:, :, :1, :1], nn.BatchNorm2d(3), activation="relu",
                       pool=batch_norm_ops.MaxPool((3, 3), (1, 1), (0, 0), (1, 1)))
    with pytest.raises(ValueError, match="residual"):
        batch_norm_act(y, nn.BatchNorm2d(3), y, activation="relu", pool=batch_norm_ops.MaxPool(*POOLS[0]))


def test_the_average_of_a_chain_is_pytorchs_mean_of_the_stored_activation():
    """`normalize_average` (fp16, channels_last, odd 7 x 6 images) against PyTorch's mean of the activation as
    stored (rounded to fp16), in float64: the sum in fp32, one rounding at the end; a NaN and an inf reach their
    own image and channel only."""
    from triton_workbench.kernels import batch_norm
    from triton_workbench.kernels.activation import activation_code

    torch.manual_seed(29)
    y = torch.randn(3, 5, 7, 6).half().contiguous(memory_format=torch.channels_last)
    y[1, 2, 3, 4], y[2, 0, 0, 0] = float("nan"), float("inf")
    norm = batch_norm.Norm(torch.randn(5), torch.rand(5) + 0.5, torch.rand(5) + 0.5, torch.randn(5), True)
    out = batch_norm.normalize_average(y, norm, None, None, activation_code("relu"), 0.0)
    channel = lambda t: t.double()[None, :, None, None]  # noqa: E731
    stored = torch.relu((y.double() - channel(norm.mean)) * channel(norm.invstd) * channel(norm.weight)
                        + channel(norm.bias)).half().double()
    expected = stored.mean((2, 3), keepdim=True).half().double()
    assert out.shape == (3, 5, 1, 1) and out.dtype == torch.float16
    assert out[1, 2].isnan().all() and out[2, 0].isinf().all()
    finite = expected.isfinite()
    assert finite.sum() == 13 and torch.equal(out.double()[~finite].isnan(), expected[~finite].isnan())
    torch.testing.assert_close(out.double()[finite], expected[finite], rtol=1e-3, atol=1e-3)
