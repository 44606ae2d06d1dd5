"""kernels.nn: the Triton modules and swap (structure, shared parameters, identical training)."""

import copy
import logging

import pytest
import torch
from torch import nn

import triton_workbench.kernels.nn as knn
from numerics import output_after_backward


def _model(device: torch.device = torch.device("cpu")) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 16), nn.GELU(),
        nn.Linear(16, 16), nn.LeakyReLU(0.2),
        nn.Sequential(nn.Linear(16, 12), nn.GELU(approximate="tanh")),
        nn.Linear(12, 12, bias=False), nn.SiLU(),
        nn.Linear(12, 3),
    )
    return model.to(device)


def _chain_calls(model: nn.Module) -> list[tuple[str, str | None]]:
    """(kernels.chains function, fused activation) of every rewritten node of a swapped model, in order."""
    return [(node.target.__name__, node.kwargs.get("activation", node.args[1] if node.target.__name__ == "activation"
                                                   else None))
            for node in model.graph.nodes if node.op == "call_function" and "chains" in node.target.__module__]


def test_swap_fuses_layers_keeps_state_dict_and_shares_parameters(caplog):
    model = _model()
    keys = list(model.state_dict())
    parameters = list(model.parameters())
    x = torch.randn(4, 6)
    expected = model(x)
    with caplog.at_level(logging.INFO, logger="triton_workbench.kernels"):
        swapped = knn.swap(model)
    assert list(swapped.state_dict()) == keys
    assert all(a is b for a, b in zip(swapped.parameters(), parameters))
    assert _chain_calls(swapped) == [("linear_act", "gelu"), ("linear_act", "leaky_relu"), ("linear_act", "gelu_tanh"),
                                     ("linear_act", "silu"), ("linear_act", None)]
    slopes = [node.kwargs.get("negative_slope") for node in swapped.graph.nodes if node.op == "call_function"]
    assert 0.2 in slopes
    assert "4 chains fused, 1 modules swapped alone, 0 left in PyTorch" in caplog.text
    torch.testing.assert_close(swapped(x), expected, rtol=1e-4, atol=1e-5)
    again = knn.swap(swapped)  # swapping again changes nothing
    assert _chain_calls(again) == _chain_calls(swapped) and not [r for r in again.swap_records if r.action != "kept"]


def test_swap_replaces_lone_activations_and_reports_what_it_left(capsys, device):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.Tanh()
            self.proj = nn.Linear(4, 4).double()  # float64: no kernel for it
            self.proj_act = nn.ReLU()  # sees float64 after proj: stays in torch with it
            self.norm = nn.LayerNorm(4)
            self.gate = nn.Sigmoid()

        def forward(self, x):
            side = self.proj_act(self.proj(x.double())).float()
            return self.gate(self.norm(self.act(x))) + torch.sigmoid(side)

    model = nn.Sequential(nn.ReLU(), Block()).to(device)
    x = torch.randn(3, 4, device=device)
    expected = model(x)
    swapped = knn.swap(model, verbose=True)
    assert [call for call, _ in _chain_calls(swapped)] == ["activation"] * 4  # relu, tanh, sigmoid x 2
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["module", "path", "type", "action", "detail"]
    rows = {line.split()[0]: line for line in table[2:]}
    assert "kept" in rows["1.proj"] and "float64 not supported" in rows["1.proj"]
    assert "follows 1.proj" in rows["1.proj_act"]
    assert "no Triton kernel" in rows["1.norm"] and "swapped" in rows["1.gate"]
    assert len({line.index("swapped") for line in table if " swapped " in line}) == 1  # aligned columns
    torch.testing.assert_close(swapped(x), expected)


def test_swap_rejects_a_non_container():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        knn.swap("model")
    with pytest.raises(ValueError, match="container"):
        knn.swap(nn.Linear(2, 2))


def test_swapped_model_trains_identically_and_optimizer_state_stays_valid(device):
    reference, swapped = _model(device), _model(device)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (reference, swapped)]
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(10, 6, generator=generator).to(device),
                torch.randint(0, 3, (10,), generator=generator).to(device)) for _ in range(5)]

    def step(model, optimizer, x, y):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        return loss.item()

    losses = [[step(m, o, *batches[0])] for m, o in zip((reference, swapped), optimizers)]
    swapped = knn.swap(swapped)  # mid-training: the momentum buffers must keep belonging to the parameters
    for x, y in batches[1:]:
        for history, model, optimizer in zip(losses, (reference, swapped), optimizers):
            history.append(step(model, optimizer, x, y))
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-5, atol=0)
    assert losses[0][-1] < losses[0][0]  # it did learn
    state = optimizers[1].state
    assert all(p in state and "momentum_buffer" in state[p] for p in swapped.parameters())
    for a, b in zip(reference.parameters(), swapped.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_triton_linear_is_a_drop_in_linear(device):
    torch.manual_seed(2)
    layer = knn.TritonLinear(5, 3, activation="sigmoid", device=device)
    plain = nn.Linear(5, 3, device=device)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(2, 4, 5, device=device)
    torch.testing.assert_close(layer(x), torch.sigmoid(plain(x)))
    assert "activation=sigmoid" in repr(layer)
    clone = copy.deepcopy(layer)
    assert clone.activation == "sigmoid" and clone.weight is not layer.weight
    with pytest.raises(ValueError, match="activation must be"):
        knn.TritonActivation("swish")


def test_modules_reject_an_unknown_activation_when_built():
    from triton_workbench.kernels.nn import TritonConv2d, TritonLinear

    with pytest.raises(ValueError, match="activation"):
        TritonLinear(3, 4, activation="swish")
    with pytest.raises(ValueError, match="activation"):
        TritonConv2d(3, 4, 3, activation="bogus")


def test_swap_never_breaks_a_model_the_kernels_cannot_run(capsys):
    class Block(nn.Module):  # the activation follows a BatchNorm, which stays in PyTorch for its dtype
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.act = nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.SiLU()

        def forward(self, x):
            return self.act(self.bn(self.conv(x)))

    model = nn.Sequential(Block(), nn.Flatten(), nn.Linear(12, 4), nn.Tanh()).double()
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    expected = model(x)
    swapped = knn.swap(model, verbose=True)
    torch.testing.assert_close(swapped(x), expected)
    assert not _chain_calls(swapped)
    table = capsys.readouterr().out
    assert "follows 0.bn, left in PyTorch" in table and "dtype torch.float64 not supported" in table


def test_swapped_conv_model_runs_channels_last_from_its_entry():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    x = torch.randn(2, 3, 6, 5)  # NCHW in
    expected = model(x)
    parameters = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model = knn.swap(model, channels_last=True)
    assert [p for p in model.parameters()] == parameters  # the same Parameter objects
    first = model.get_submodule("0")
    assert first.weight.is_contiguous(memory_format=torch.channels_last)
    out = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last)
    out.sum().backward()
    before = first.weight.detach().clone()
    optimizer.step()  # the optimizer built before the swap still updates the model's parameters
    assert not torch.equal(first.weight.detach(), before)
    knn.use_channels_last(model)  # idempotent: one conversion hook
    assert len(model._forward_pre_hooks) == 1


def test_swap_keeps_the_layout_unless_asked_so_views_in_a_models_forward_still_work():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4 * 3 * 3, 2)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).view(x.size(0), -1))  # .view needs a contiguous conv output

    model = Net()
    x = torch.randn(2, 3, 5, 5)
    expected = model(x)
    model = knn.swap(model)
    assert model.conv.weight.is_contiguous()  # left as it was
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)


def test_channels_last_weights_run_the_conv_channels_last_as_pytorch_does():
    """A one-channel input is dense in both layouts; after it, channels_last weights decide, as in PyTorch."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    x = torch.randn(2, 1, 6, 6)
    expected = model(x)
    model = knn.swap(model, channels_last=True)
    out = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()


class _DenseBlock(nn.ModuleDict):
    """As torchvision's densenet._DenseBlock: a ModuleDict with a forward of its own, here one chain
    conv -> BN -> ReLU across its entries, whose output is concatenated to its input."""

    def __init__(self):
        super().__init__({"conv": nn.Conv2d(3, 4, 3, padding=1, bias=False), "norm": nn.BatchNorm2d(4),
                          "relu": nn.ReLU()})

    def forward(self, x):
        features = x
        for _, layer in self.items():
            features = layer(features)
        return torch.cat([x, features], 1)


class _Gated(nn.Module):
    """Data-dependent control flow: walked, so its children (the _DenseBlock among them) are swapped one by one."""

    def __init__(self):
        super().__init__()
        self.block, self.fc = _DenseBlock(), nn.Linear(7, 2)

    def forward(self, x):
        x = self.block(x if x.sum() > 0 else -x)
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("make, prefix", [(_DenseBlock, ""), (_Gated, "block.")])
def test_a_module_dict_with_a_forward_of_its_own_is_traced_and_fused(make, prefix):
    torch.manual_seed(6)
    model = make()
    reference = copy.deepcopy(model).double()
    swapped = knn.swap(model)
    records = {record.path: (record.action, record.detail) for record in swapped.swap_records}
    assert records[f"{prefix}conv"] == ("fused", "conv -> norm -> relu"), records
    assert not [path for path, (action, _) in records.items() if action == "kept"], records
    assert (prefix.rstrip(".") or "(model)") not in records  # the block itself traced, not walked
    x = torch.randn(2, 3, 5, 5)
    for mode in ("train", "eval"):
        swapped.train(mode == "train"), reference.train(mode == "train")
        outputs = [output_after_backward(net, inputs) for net, inputs in ((swapped, x), (reference, x.double()))]
        torch.testing.assert_close(outputs[0], outputs[1].float(), rtol=1e-4, atol=1e-5)
        for (name, ours), theirs in zip(swapped.named_parameters(), reference.parameters()):
            torch.testing.assert_close(ours.grad, theirs.grad.float(), rtol=1e-4, atol=1e-4, msg=f"{mode} {name}")
        for (name, ours), theirs in zip(swapped.named_buffers(), reference.buffers()):
            torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-4, atol=1e-5, msg=f"{mode} {name}")
