"""nn.MultiheadAttention through swap: its projections on the Triton GEMM (kernels.attention), the attention in
PyTorch; outputs, attention weights and every gradient against nn.MultiheadAttention itself in float64, on odd
sizes (embed 12, 3 heads, 5 queries, 7 keys), self- and cross-attention, masks, batch_first both ways; inside a
transformer block and nn.TransformerEncoderLayer (its eval fast path too). Interpreter on CPU."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import triton_workbench.kernels.nn as knn
from triton_workbench.kernels import adapters, ops
from triton_workbench.kernels.attention import TritonMultiheadAttention
from numerics import relative_error

EMBED, HEADS, TARGET, SOURCE, BATCH = 12, 3, 5, 7, 2


def _records(model: nn.Module) -> dict[str, tuple[str, str]]:
    return {record.path: (record.action, record.detail) for record in model.swap_records}


def _masks(generator: torch.Generator, source: int, case: dict) -> dict:
    """The masks a case asks for, in float64 (float ones are cast to each model's dtype)."""
    masks = {}
    unbatched = case.get("unbatched", False)
    if "kpm" in case:
        padding = torch.zeros((source,) if unbatched else (BATCH, source), dtype=torch.bool)
        padding[..., -2:] = True if unbatched else torch.tensor([True, False])  # no row fully masked
        masks["key_padding_mask"] = padding if case["kpm"] == "bool" else padding.double() * -3.0
    if "attn_mask" in case:
        shape = {"2d": (TARGET, source), "3d": ((1 if unbatched else BATCH) * HEADS, TARGET, source)}[case["shape"]]
        if case["attn_mask"] == "bool":
            mask = torch.rand(shape, generator=generator) > 0.6
            mask[..., 0] = False
        else:
            mask = torch.randn(shape, generator=generator, dtype=torch.float64)
        masks["attn_mask"] = mask
    return masks


CASES = {
    "self_seq_first_defaults": dict(pattern="qqq"),
    "self_batch_first_bool_masks_no_weights": dict(pattern="qqq", batch_first=True, kpm="bool", attn_mask="bool",
                                                   shape="2d", need_weights=False),
    "self_batch_first_float_3d_mask_per_head_weights": dict(pattern="qqq", batch_first=True, attn_mask="float",
                                                            shape="3d", average_attn_weights=False),
    "cross_shared_kv_float_padding": dict(pattern="qkk", kpm="float"),
    "cross_shared_kv_batch_first_no_bias": dict(pattern="qkk", batch_first=True, bias=False, attn_mask="bool",
                                                shape="2d", need_weights=False),
    "cross_kdim_vdim_batch_first_bool_padding": dict(pattern="qkv", batch_first=True, kdim=5, vdim=4, kpm="bool",
                                                     need_weights=False),
    "cross_kdim_vdim_seq_first_weights": dict(pattern="qkv", kdim=5, vdim=4, attn_mask="bool", shape="2d"),
    "cross_three_tensors_3d_float_mask": dict(pattern="qkv", attn_mask="float", shape="3d", need_weights=False),
    "bias_kv_zero_attn_masks_weights": dict(pattern="qkk", add_bias_kv=True, add_zero_attn=True, kpm="bool",
                                            attn_mask="float", shape="2d"),
    "bias_kv_zero_attn_masks_sdpa": dict(pattern="qqq", batch_first=True, add_bias_kv=True, add_zero_attn=True,
                                         kpm="bool", attn_mask="bool", shape="3d", need_weights=False),
    "unbatched_self_weights": dict(pattern="qqq", unbatched=True, kpm="bool", attn_mask="float", shape="3d"),
    "unbatched_cross_batch_first_no_weights": dict(pattern="qkv", unbatched=True, batch_first=True,
                                                   need_weights=False),
}
MODULE_ARGUMENTS = ("batch_first", "kdim", "vdim", "bias", "add_bias_kv", "add_zero_attn")
CALL_ARGUMENTS = ("need_weights", "average_attn_weights", "is_causal")


def _inputs(case: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """query, key, value (by name in the case's pattern: 'qqq' self-attention, 'qkk' key is value), float64."""
    dims = {"q": EMBED, "k": case.get("kdim", EMBED), "v": case.get("vdim", EMBED)}
    lengths = {"q": TARGET, "k": SOURCE, "v": SOURCE}
    tensors = {}
    for name in dict.fromkeys(case["pattern"]):
        length = TARGET if case["pattern"] == "qqq" else lengths[name]
        shape = (length, dims[name]) if case.get("unbatched") else (
            (BATCH, length, dims[name]) if case.get("batch_first") else (length, BATCH, dims[name]))
        tensors[name] = torch.randn(shape, generator=generator, dtype=torch.float64)
    return tensors


def _run(module: nn.Module, tensors: dict, masks: dict, case: dict, dtype: torch.dtype, grads: tuple | None):
    """(output, weights, input gradients by name, parameter gradients by name) of one forward and backward."""
    module.zero_grad()
    leaves = {name: tensor.detach().to(dtype).requires_grad_() for name, tensor in tensors.items()}
    query, key, value = (leaves[name] for name in case["pattern"])
    masks = {name: mask.to(dtype) if mask.is_floating_point() else mask for name, mask in masks.items()}
    out, weights = module(query, key, value, **masks, **{k: case[k] for k in CALL_ARGUMENTS if k in case})
    loss = (out * grads[0].to(dtype)).sum()
    if weights is not None:
        loss = loss + (weights * grads[1].to(dtype)).sum()
    loss.backward()
    return out, weights, {name: leaf.grad for name, leaf in leaves.items()}, \
        {name: parameter.grad for name, parameter in module.named_parameters()}


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")  # a bool and a float mask, as in PyTorch
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_multihead_attention_in_float64(name):
    case = CASES[name]
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(EMBED, HEADS, **{k: case[k] for k in MODULE_ARGUMENTS if k in case}).double()
    if case.get("add_bias_kv"):  # PyTorch initialises them; make them matter
        nn.init.normal_(reference.bias_k), nn.init.normal_(reference.bias_v)
    if reference.in_proj_bias is not None:
        nn.init.normal_(reference.in_proj_bias, std=0.1)
    ours = TritonMultiheadAttention.from_module(copy.deepcopy(reference).float())
    generator = torch.Generator().manual_seed(1)
    tensors = _inputs(case, generator)
    masks = _masks(generator, TARGET if case["pattern"] == "qqq" else SOURCE, case)
    expected = reference(*(tensors[n] for n in case["pattern"]), **masks,
                         **{k: case[k] for k in CALL_ARGUMENTS if k in case})
    grads = (torch.randn(expected[0].shape, generator=generator, dtype=torch.float64),
             torch.randn(expected[1].shape, generator=generator, dtype=torch.float64) if expected[1] is not None
             else None)
    theirs = _run(reference, tensors, masks, case, torch.float64, grads)
    mine = _run(ours, tensors, masks, case, torch.float32, grads)
    assert mine[0].shape == theirs[0].shape and relative_error(mine[0], theirs[0]) < 1e-4
    assert (mine[1] is None) == (theirs[1] is None) == (not case.get("need_weights", True))
    if theirs[1] is not None:
        assert mine[1].shape == theirs[1].shape and relative_error(mine[1], theirs[1]) < 1e-4
    for kind in (2, 3):  # inputs, then every parameter
        assert mine[kind].keys() == theirs[kind].keys()
        for key, grad in theirs[kind].items():
            assert relative_error(mine[kind][key], grad) < 1e-4, key


def test_projections_run_on_the_triton_gemm_one_launch_for_a_packed_self_attention(monkeypatch):
    calls = []
    forward = ops.gemm_kernels.forward
    monkeypatch.setattr(ops.gemm_kernels, "forward", lambda *args, **kwargs: calls.append(args[0].shape) or
                        forward(*args, **kwargs))
    torch.manual_seed(2)
    attention = TritonMultiheadAttention.from_module(nn.MultiheadAttention(EMBED, HEADS))
    x, memory = torch.randn(TARGET, BATCH, EMBED), torch.randn(SOURCE, BATCH, EMBED)
    for (query, key, value), launches in (((x, x, x), 2), ((x, memory, memory), 3), ((x, memory, memory * 2), 4)):
        calls.clear()
        attention(query, key, value, need_weights=False)
        assert len(calls) == launches  # in-projection(s), then out_proj


@pytest.mark.parametrize("need_weights", [True, False])
def test_dropout_in_training_draws_what_pytorch_draws(need_weights):
    torch.manual_seed(3)
    reference = nn.MultiheadAttention(EMBED, HEADS, dropout=0.5, batch_first=True)
    ours = TritonMultiheadAttention.from_module(copy.deepcopy(reference))
    x = torch.randn(BATCH, TARGET, EMBED)
    outputs = []
    for module in (reference, ours):
        torch.manual_seed(4)
        outputs.append(module(x, x, x, need_weights=need_weights))
    torch.testing.assert_close(outputs[1][0], outputs[0][0], rtol=1e-4, atol=1e-5)
    if need_weights:  # PyTorch returns the weights after dropout
        torch.testing.assert_close(outputs[1][1], outputs[0][1])
    ours.eval()
    torch.testing.assert_close(ours(x, x, x)[0], reference.eval()(x, x, x)[0], rtol=1e-4, atol=1e-5)


def test_is_causal_hint_as_pytorch_takes_it():
    torch.manual_seed(5)
    reference = nn.MultiheadAttention(EMBED, HEADS, batch_first=True)
    ours = TritonMultiheadAttention.from_module(copy.deepcopy(reference))
    x = torch.randn(BATCH, TARGET, EMBED)
    causal = nn.Transformer.generate_square_subsequent_mask(TARGET)
    for need_weights in (False, True):
        expected = reference(x, x, x, attn_mask=causal, is_causal=True, need_weights=need_weights)
        got = ours(x, x, x, attn_mask=causal, is_causal=True, need_weights=need_weights)
        torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="Need attn_mask"):  # PyTorch's exception type
        reference(x, x, x, is_causal=True)
    with pytest.raises(RuntimeError, match="attn_mask is required"):
        ours(x, x, x, is_causal=True)


@pytest.mark.parametrize("call, error, words", [
    (lambda m, x: m(x.numpy(), x, x), TypeError, "query must be a torch.Tensor"),
    (lambda m, x: m(x[0, 0], x, x), ValueError, "query must be 3-D"),
    (lambda m, x: m(x, x[0], x), ValueError, "key and value must have query's 3"),
    (lambda m, x: m(x[..., :5], x, x), ValueError, "query's last dimension must be 12"),
    (lambda m, x: m(x, x, x[:3]), ValueError, "key and value must have the same"),
    (lambda m, x: m(x, x[:, :1], x[:, :1]), ValueError, "key's batch size"),
    (lambda m, x: m(x, x, x, key_padding_mask=torch.zeros(TARGET, BATCH, dtype=torch.bool)), ValueError,
     "key_padding_mask must have shape"),
    (lambda m, x: m(x, x, x, key_padding_mask=torch.zeros(BATCH, TARGET, dtype=torch.int64)), TypeError,
     "key_padding_mask must be bool or floating point"),
    (lambda m, x: m(x, x, x, attn_mask=torch.zeros(TARGET, TARGET + 1)), ValueError, "attn_mask must have shape"),
    (lambda m, x: m(x, x, x, attn_mask=[[0.0]]), TypeError, "attn_mask must be a torch.Tensor or None"),
    (lambda m, x: m(x.double(), x.double(), x.double()), TypeError, "has dtype torch.float64"),
])
def test_bad_input_names_the_argument(call, error, words):
    attention = TritonMultiheadAttention.from_module(nn.MultiheadAttention(EMBED, HEADS))
    with pytest.raises(error, match=words):
        call(attention, torch.randn(TARGET, BATCH, EMBED))
    with pytest.raises(TypeError, match="module must be an nn.MultiheadAttention"):
        TritonMultiheadAttention.from_module(nn.Linear(2, 2))


class _Block(nn.Module):
    """A pre-norm transformer block written as ViTs write them: attention without weights, then an MLP."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.norm1, self.norm2 = nn.LayerNorm(EMBED), nn.LayerNorm(EMBED)
        self.attn = nn.MultiheadAttention(EMBED, HEADS, batch_first=batch_first)
        self.fc1, self.act, self.fc2 = nn.Linear(EMBED, 20), nn.GELU(), nn.Linear(20, EMBED)

    def forward(self, x, padding=None):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, key_padding_mask=padding, need_weights=False)[0]
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


@pytest.mark.parametrize("batch_first", [True, False])
def test_swap_in_a_transformer_block_keeps_parameters_and_matches_pytorch(batch_first, capsys):
    torch.manual_seed(6)
    model = nn.Sequential(_Block(batch_first), nn.Linear(EMBED, 3))
    reference = copy.deepcopy(model).double()
    keys, parameters = list(model.state_dict()), list(model.parameters())
    swapped = knn.swap(model, verbose=True)
    assert capsys.readouterr().out.count("projections on the Triton GEMM") == 1
    records = _records(swapped)
    assert records["0.attn"] == ("swapped", "projections on the Triton GEMM, attention in PyTorch")
    assert records["0.fc1"] == ("fused", "0.fc1 -> 0.act") and records["1"][0] == "swapped"
    assert isinstance(swapped.get_submodule("0.attn"), TritonMultiheadAttention)
    assert list(swapped.state_dict()) == keys and all(a is b for a, b in zip(swapped.parameters(), parameters))
    x = torch.randn((BATCH, TARGET, EMBED) if batch_first else (TARGET, BATCH, EMBED))
    outputs = []
    for net, inputs in ((swapped, x), (reference, x.double())):
        out = net(inputs)
        out.backward(torch.ones_like(out))
        outputs.append(out)
    assert relative_error(*outputs) < 1e-4
    for (name, ours), theirs in zip(swapped.named_parameters(), reference.parameters()):
        assert relative_error(ours.grad, theirs.grad) < 1e-4, name
    swapped.load_state_dict(reference.float().state_dict())  # checkpoints load both ways
    reference.load_state_dict(swapped.state_dict())


def test_swap_inside_transformer_encoder_layers_train_and_eval_fast_path():
    """nn.TransformerEncoderLayer calls self.self_attn(..., need_weights=False) in training, which runs the adapter;
    in eval without grad (batch_first, even heads) its fast path reads the same parameters in PyTorch's kernel."""
    torch.manual_seed(7)
    layer = nn.TransformerEncoderLayer(6, 2, 10, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(6, 2))
    reference = copy.deepcopy(model).double()
    swapped = knn.swap(model)
    records = _records(swapped)
    for index in (0, 1):
        action, detail = records[f"0.layers.{index}.self_attn"]
        assert action == "swapped" and "fast path" in detail
        assert isinstance(swapped.get_submodule(f"0.layers.{index}.self_attn"), TritonMultiheadAttention)
    x = torch.randn(BATCH, SOURCE, 6)
    padding = torch.zeros(BATCH, SOURCE, dtype=torch.bool)
    padding[0, -3:] = True
    outputs = []
    for net, inputs in ((swapped, x), (reference, x.double())):
        encoder, head = net.get_submodule("0"), net.get_submodule("1")
        out = head(encoder(inputs, src_key_padding_mask=padding))
        out.backward(torch.ones_like(out))
        outputs.append(out)
    assert relative_error(*outputs) < 1e-4
    for (name, ours), theirs in zip(swapped.named_parameters(), reference.parameters()):
        assert relative_error(ours.grad, theirs.grad) < 1e-4, name
    swapped.eval(), reference.eval()
    with torch.no_grad():
        got = swapped.get_submodule("1")(swapped.get_submodule("0")(x, src_key_padding_mask=padding))
        expected = reference[1](reference[0](x.double(), src_key_padding_mask=padding))
    assert relative_error(got, expected) < 1e-4


def test_attention_the_kernels_cannot_run_stays_in_pytorch_with_the_reason():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.hooked, self.wide = nn.MultiheadAttention(EMBED, HEADS), nn.MultiheadAttention(EMBED, HEADS).double()

        def forward(self, x):
            y = self.hooked(x, x, x)[0]
            return self.wide(y.double(), y.double(), y.double())[0]

    net = Net()
    net.hooked.register_forward_hook(lambda module, inputs, output: None)
    x = torch.randn(TARGET, BATCH, EMBED)
    expected = net(x)
    swapped = knn.swap(net)
    records = _records(swapped)
    assert records["hooked"][0] == "kept" and "forward hooks" in records["hooked"][1]
    assert records["wide"][0] == "kept" and "float64 not supported" in records["wide"][1]
    assert type(swapped.hooked) is nn.MultiheadAttention and not any(path.startswith("wide.") for path in records)
    torch.testing.assert_close(swapped(x), expected)


class _Scale(nn.Module):
    """A parametrization: the weight PyTorch computes from the stored one."""

    def forward(self, weight):
        return weight * 2


def test_a_parametrized_attention_stays_in_pytorch_and_both_models_still_run():
    """torch.nn.utils.parametrize swaps the module's class for one whose property computes in_proj_weight; an adapter
    built from the module would lose that property (and adapt replaces the module in the user's own tree)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.fc = nn.MultiheadAttention(EMBED, HEADS), nn.Linear(EMBED, EMBED)

        def forward(self, x):
            return self.fc(self.attn(x, x, x, need_weights=False)[0])

    torch.manual_seed(9)
    net = Net()
    parametrize.register_parametrization(net.attn, "in_proj_weight", _Scale())
    x = torch.randn(TARGET, BATCH, EMBED)
    expected = net(x)
    assert adapters.find(net.attn) is None
    swapped = knn.swap(net)
    records = _records(swapped)
    assert records["attn"][0] == "kept" and "parametrize" in records["attn"][1] and \
        "in_proj_weight" in records["attn"][1], records["attn"]
    assert records["fc"][0] == "swapped" and parametrize.is_parametrized(net.attn, "in_proj_weight")
    torch.testing.assert_close(swapped(x), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(net(x), expected)


def test_hooks_other_than_forward_run_on_the_adapter_and_their_handles_remove_them():
    """Backward and state-dict hooks registered before the swap: the adapter runs them, and each handle's remove()
    reaches it (the hook dicts are the module's own, not copies)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(EMBED, HEADS)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    torch.manual_seed(10)
    model = Net()
    attention, calls = model.attn, []
    handles = [
        attention.register_full_backward_hook(lambda module, grad_in, grad_out: calls.append("backward")),
        attention.register_full_backward_pre_hook(lambda module, grad_out: calls.append("backward_pre")),
        attention.register_state_dict_pre_hook(lambda module, prefix, keep_vars: calls.append("state_dict_pre")),
        attention.register_state_dict_post_hook(lambda module, state, prefix, local: calls.append("state_dict")),
        attention.register_load_state_dict_pre_hook(lambda module, state, prefix, *args: calls.append("load_pre")),
        attention.register_load_state_dict_post_hook(lambda module, keys: calls.append("load"))]
    swapped = knn.swap(model)
    assert _records(swapped)["attn"][0] == "swapped" and isinstance(model.attn, TritonMultiheadAttention)
    x = torch.randn(TARGET, BATCH, EMBED, requires_grad=True)

    def run() -> list[str]:
        calls.clear()
        swapped(x).sum().backward()
        swapped.load_state_dict(swapped.state_dict())
        return sorted(calls)

    assert run() == ["backward", "backward_pre", "load", "load_pre", "state_dict", "state_dict_pre"]
    for handle in handles:
        handle.remove()
    assert run() == []


def test_a_subclass_keeping_forward_is_adapted_one_overriding_it_is_not():
    class Keeps(nn.MultiheadAttention):
        pass

    class Overrides(nn.MultiheadAttention):
        def forward(self, query, key, value, **kwargs):
            return super().forward(query, key, value, **kwargs)

    model = nn.ModuleDict({"keeps": Keeps(EMBED, HEADS), "overrides": Overrides(EMBED, HEADS)})
    swapped = knn.swap(model)
    records = _records(swapped)
    assert records["keeps"][0] == "swapped" and isinstance(model["keeps"], TritonMultiheadAttention)
    assert records["overrides"][0] == "kept" and "overrides the forward of torch.nn" in records["overrides"][1]
    assert type(model["overrides"]) is Overrides and "overrides.out_proj" not in records
    x = torch.randn(TARGET, BATCH, EMBED)
    torch.testing.assert_close(model["keeps"](x, x, x)[0], nn.MultiheadAttention.forward(model["keeps"], x, x, x)[0],
                               rtol=1e-4, atol=1e-5)


def test_swapped_attention_runs_under_fake_tensors_and_counts_the_same_flops():
    """Shapes-only runs (FakeTensorMode, FlopCounterMode), as torch.compile and FLOP counting use them."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(EMBED, HEADS, batch_first=True)

        def forward(self, x, memory):
            return self.attn(x, x, x, need_weights=False)[0] + self.attn(x, memory, memory)[0]

    torch.manual_seed(8)
    eager = Net()
    counts = []
    for model in (copy.deepcopy(eager), knn.swap(copy.deepcopy(eager))):
        with FakeTensorMode(allow_non_fake_inputs=True), FlopCounterMode(display=False) as counter:
            out = model(torch.randn(BATCH, TARGET, EMBED), torch.randn(BATCH, SOURCE, EMBED))
            out.sum().backward()
        assert out.shape == (BATCH, TARGET, EMBED)
        counts.append(counter.get_total_flops())
    assert counts[0] > 0 and counts[1] == counts[0]
