"""The fusion pass: trace a model with torch.fx, find the chains the Triton kernels fuse, rewrite them.

Chains, found in the graph whatever the module structure (nn.Sequential, a block's `forward`, one
activation module used at several places, functional calls, in-place variants):

    conv -> BN [-> + residual] [-> activation]      -> chains.conv_bn_act
    BN [-> + residual] [-> activation]              -> chains.bn_act
    either, activation-ended without a residual, -> MaxPool2d (ResNet's stem): the same, pooled
    either, activation-ended, -> AdaptiveAvgPool2d(1) (a classifier's head): the same, averaged
    conv -> activation, linear -> activation        -> chains.conv_act, chains.linear_act
    conv, linear, activation alone                  -> the same, without the rest

Each link but the last must have no other user. A residual that is itself conv -> BN with no
other user (a downsample shortcut) is deferred: it stays raw and the consumer's fused kernel
normalises it. A conv_bn_act call hands its input on to the input's later readers (their gradient is
added in its dgrad launch), and where it is then the only reader of a BN chain's output, reading it
once, that chain hands it what the dgrad launch needs to form the chain's backward sums too
(`ChainSums`). The rewritten nodes call `kernels.chains` functions with the model's own modules
(get_attr nodes), so parameters, buffers, state_dict keys and train/eval behaviour are the
original model's. `fuse` returns a torch.fx.GraphModule that shares the model's top-level children,
parameters and buffers (the whole module tree, used or not), and a record per decision.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn

from triton_workbench.kernels import calls, chains, ops
from triton_workbench.kernels.activation import DEFAULT_NEGATIVE_SLOPE
from triton_workbench.kernels.conv_depthwise import is_depthwise
from triton_workbench.kernels.global_average_pool import GlobalAveragePool
from triton_workbench.kernels.max_pool import MaxPool


@dataclass
class SwapRecord:
    """One line of swap's report: a module (or graph node), what became of it, and why."""

    path: str
    module: str
    action: str  # "fused", "swapped", "absorbed" (folded into the layer before it), "kept"
    detail: str


# activation module type -> its functional form's name; the module attributes that are that form's arguments
_MODULES: dict[type[nn.Module], str] = {
    nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.GELU: "gelu", nn.SiLU: "silu", nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh", nn.ReLU6: "relu6", nn.Hardtanh: "hardtanh", nn.Hardswish: "hardswish",
    nn.Hardsigmoid: "hardsigmoid", nn.Mish: "mish", nn.ELU: "elu", nn.CELU: "celu", nn.SELU: "selu",
    nn.Softplus: "softplus",
}
_MODULE_ARGUMENTS = {"leaky_relu": ("negative_slope",), "gelu": ("approximate",), "hardtanh": ("min_val", "max_val"),
                     "elu": ("alpha",), "celu": ("alpha",), "softplus": ("beta", "threshold")}


def _resolve(name: str, arguments: dict[str, object]) -> tuple[str | None, float, str | None]:
    """(kernel name, parameter, None) for activation `name` (a functional form's) called with keyword
    `arguments` (input and inplace left out), or (None, default, why not) if the kernels do not take them.
    hardtanh is relu6 at (0, 6) only; elu's scale and input_scale must be 1; the rest `ops.resolve_activation`
    checks (alpha, negative_slope, approximate, softplus's beta and threshold)."""
    arguments = dict(arguments)
    if name == "hardtanh":
        bounds = arguments.pop("min_val", -1.0), arguments.pop("max_val", 1.0)
        if bounds != (0, 6):
            return None, DEFAULT_NEGATIVE_SLOPE, f"hardtanh{bounds}: the kernels have (0, 6) only (relu6)"
        name = "relu6"
    if name == "elu" and (arguments.pop("scale", 1) != 1 or arguments.pop("input_scale", 1) != 1):
        return None, DEFAULT_NEGATIVE_SLOPE, "elu with a scale or input_scale other than 1"
    try:
        kernel_name, parameter = ops.resolve_activation(name, **arguments)
    except (TypeError, ValueError) as error:
        return None, DEFAULT_NEGATIVE_SLOPE, str(error)
    return kernel_name, parameter, None


def _module_activation(module: nn.Module) -> tuple[str | None, float, str | None]:
    """`_resolve` for an activation module (exact type); (None, default, None) for any other module."""
    name = _MODULES.get(type(module))
    if name is None:
        return None, DEFAULT_NEGATIVE_SLOPE, None
    return _resolve(name, {key: getattr(module, key) for key in _MODULE_ARGUMENTS.get(name, ())})


def behaves_as(module: nn.Module | None, kind: type[nn.Module]) -> bool:
    """Whether `module` computes what `kind` does: an instance of it whose class overrides neither `forward`
    nor the `_conv_forward` a conv's forward calls (a subclass that only adds attributes, as PyTorch's
    NonDynamicallyQuantizableLinear, yes; timm's Conv2dSame, which pads in its own forward, no)."""
    cls = type(module)
    return isinstance(module, kind) and all(getattr(cls, name, None) is getattr(kind, name, None)
                                            for name in ("forward", "_conv_forward"))


def activation_of(module: nn.Module) -> tuple[str, float] | None:
    """(kernel activation name, its parameter) of a supported activation module, else None."""
    name, parameter, _ = _module_activation(module)
    return (name, parameter) if name is not None else None


_FUNCTIONS: dict[Callable, str] = {
    F.relu: "relu", torch.relu: "relu", F.relu_: "relu", torch.relu_: "relu", F.silu: "silu", F.gelu: "gelu",
    torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", torch.tanh: "tanh", F.tanh: "tanh", F.leaky_relu: "leaky_relu",
    F.relu6: "relu6", F.hardtanh: "hardtanh", F.hardtanh_: "hardtanh", F.hardswish: "hardswish",
    F.hardsigmoid: "hardsigmoid", F.mish: "mish", F.elu: "elu", F.elu_: "elu", F.celu: "celu", torch.celu: "celu",
    torch.celu_: "celu", F.selu: "selu", torch.selu: "selu", torch.selu_: "selu", F.softplus: "softplus",
}
_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid", "tanh": "tanh",
            "tanh_": "tanh"}
_IN_PLACE_FUNCTIONS = (F.relu_, torch.relu_, F.hardtanh_, F.elu_, torch.celu_, torch.selu_, operator.iadd)
NO_KERNEL = "no Triton kernel for this module"
_NO_POOL_CHAIN = "a max-pool runs in a Triton kernel only after a BN -> activation chain that it alone reads"
# a layer alone or with its activation -> the function that runs it
LAYER_FUNCTIONS = {nn.Conv2d: chains.conv_act, nn.Conv1d: chains.conv1d_act,
                   nn.ConvTranspose2d: chains.conv_transpose_act, nn.Linear: chains.linear_act}
# functional layers -> the op that takes the same arguments (a subclass's own forward, functional code)
FUNCTIONAL_LAYERS = {F.conv2d: ops.conv2d, torch.conv2d: ops.conv2d, F.linear: ops.linear}
CHAIN_FUNCTIONS = (chains.conv_bn_act, chains.bn_act, chains.activation, chains.prelu, *LAYER_FUNCTIONS.values(),
                   *set(FUNCTIONAL_LAYERS.values()))


@dataclass
class Activation:
    node: fx.Node
    name: str
    negative_slope: float
    source: fx.Node  # its input


@dataclass
class Chain:
    """Graph nodes that become one `kernels.chains` call; `last` is the node whose value it produces."""

    source: fx.Node  # the chain's input tensor
    conv: fx.Node | None = None
    linear: fx.Node | None = None
    bn: fx.Node | None = None
    add: fx.Node | None = None
    residual: fx.Node | None = None
    residual_bn: fx.Node | None = None  # a deferred residual's BN (its producer leaves it raw)
    activation: Activation | None = None
    defer: bool = False
    in_place: bool = False  # the add was `main += residual`: its result keeps main's dtype
    prelu: fx.Node | None = None  # a PReLU module (a learnable activation: alone)
    pool: fx.Node | None = None  # a MaxPool2d module reading the activation
    nodes: list[fx.Node] = field(default_factory=list)


class _Tracer(fx.Tracer):
    """torch.nn's own modules (and `leaves`) stay call_module nodes, `kernels.chains` functions call_function
    nodes; everything else is traced through."""

    def __init__(self, leaves: tuple[type[nn.Module], ...]) -> None:
        super().__init__(autowrap_functions=CHAIN_FUNCTIONS)  # a swapped model's calls stay calls when re-traced
        self._leaves = leaves

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, self._leaves) or super().is_leaf_module(module, qualified_name)


class _Graph:
    """The traced graph with the questions the matcher asks of its nodes."""

    def __init__(self, gm: fx.GraphModule, supported: Callable[[nn.Module], str | None],
                 activations_reason: str | None):
        self.gm, self.graph = gm, gm.graph
        self._supported = supported
        self._activations_reason = activations_reason
        self.taken: set[fx.Node] = set()
        self.kept: dict[fx.Node, str] = {}
        self.replaced: dict[fx.Node, fx.Node] = {}  # a rewritten chain's last node -> the call that replaced it

    def current(self, node: fx.Node) -> fx.Node:
        """The node that now produces what `node` produced (itself unless a rewrite replaced it)."""
        while node in self.replaced:
            node = self.replaced[node]
        return node

    def module(self, node: fx.Node) -> nn.Module | None:
        return self.gm.get_submodule(node.target) if node.op == "call_module" else None

    def _is(self, node: object, kind: type[nn.Module]) -> bool:
        if not isinstance(node, fx.Node) or node in self.taken or not behaves_as(self.module(node), kind):
            return False
        reason = self._supported(self.module(node))
        if reason is not None:
            self.kept[node] = reason
        return reason is None and len(node.args) == 1 and not node.kwargs

    def conv(self, node: object) -> bool:
        return self._is(node, nn.Conv2d)

    def conv1d(self, node: object) -> bool:
        return self._is(node, nn.Conv1d)

    def conv_transpose(self, node: object) -> bool:
        return self._is(node, nn.ConvTranspose2d)

    def prelu(self, node: object) -> bool:
        return self._is(node, nn.PReLU)

    def linear(self, node: object) -> bool:
        return self._is(node, nn.Linear)

    def bn(self, node: object) -> bool:
        return self._is(node, nn.BatchNorm2d)

    def max_pool(self, node: object) -> bool:
        """A MaxPool2d module the BN kernels can end a chain with: floor mode, no indices returned, a window
        `MaxPool` takes (else it stays in PyTorch, which raises its own error for a window it refuses)."""
        if not isinstance(node, fx.Node) or node in self.taken or not behaves_as(self.module(node), nn.MaxPool2d):
            return False
        pool = self.module(node)
        try:
            MaxPool.of_module(pool)
        except (TypeError, ValueError) as error:
            self.kept[node] = f"a max-pool the BN kernels do not take: {error}"
            return False
        reason = self._supported(pool) or ("ceil mode" if pool.ceil_mode else None) or \
            ("it returns indices" if pool.return_indices else None)
        if reason is not None:
            self.kept[node] = reason
        return reason is None and len(node.args) == 1 and not node.kwargs

    def average_pool(self, node: object) -> bool:
        """An AdaptiveAvgPool2d to 1 x 1 the BN kernels can end a chain with (`GlobalAveragePool`)."""
        module = self.module(node) if isinstance(node, fx.Node) else None
        if module is None or node in self.taken or not (GlobalAveragePool.takes(module) and
                                                        behaves_as(module, nn.AdaptiveAvgPool2d)):
            return False
        reason = self._supported(module)
        if reason is not None:
            self.kept[node] = reason
        return reason is None and len(node.args) == 1 and not node.kwargs

    def owner(self, node: object) -> nn.Module | None:
        """The module owning the parameter a get_attr node reads, else None."""
        if not isinstance(node, fx.Node) or node.op != "get_attr":
            return None
        path = node.target.rpartition(".")[0]
        return self.gm.get_submodule(path) if path else self.gm

    @staticmethod
    def only_user(node: fx.Node, user: fx.Node) -> bool:
        return list(node.users) == [user]

    def activation(self, node: fx.Node) -> Activation | None:
        """The supported activation `node` computes, unless it mutates an input that something else reads."""
        if node in self.taken:
            return None
        if node.op == "call_module":
            name, slope, unsupported = _module_activation(self.module(node))
            in_place = getattr(self.module(node), "inplace", False)
            if name is not None and unsupported is None:
                unsupported = self._supported(self.module(node))  # e.g. forward hooks a kernel would skip
                name = name if unsupported is None else None
        elif node.op == "call_function" and node.target in _FUNCTIONS:
            name, slope, in_place, unsupported = self._function_activation(node)
        elif node.op == "call_method" and node.target in _METHODS and len(node.args) == 1 and not node.kwargs:
            name, slope, in_place, unsupported = _METHODS[node.target], DEFAULT_NEGATIVE_SLOPE, \
                node.target.endswith("_"), None
        else:
            return None
        if unsupported is not None:
            self.kept[node] = unsupported
        if name is None or not node.args or not isinstance(node.args[0], fx.Node):
            return None
        source = node.args[0]
        reason = self._activations_reason
        if source in self.kept:
            reason = f"follows {source.target if source.op == 'call_module' else source.name}, left in PyTorch"
        elif in_place and not self.only_user(source, node):
            reason = "in place on a tensor something else also reads"
        if reason is not None:
            self.kept[node] = reason
            return None
        return Activation(node, name, slope, source)

    def _function_activation(self, node: fx.Node) -> tuple[str | None, float, bool, str | None]:
        """(name, parameter, in place, None) of an activation function call; (None, default, in place, why not)
        if its arguments are not ones the kernels take."""
        in_place = node.target in _IN_PLACE_FUNCTIONS
        arguments: dict[str, object] = {}
        if len(node.args) > 1 or node.kwargs:
            try:
                arguments = dict(node.normalized_arguments(self.gm, normalize_to_only_use_kwargs=True).kwargs)
            except (RuntimeError, AttributeError):  # no unambiguous signature (None has no .kwargs)
                return None, DEFAULT_NEGATIVE_SLOPE, False, "its arguments could not be matched to a signature"
            arguments.pop("input", None)
            in_place = bool(arguments.pop("inplace", False)) or in_place
        name, parameter, unsupported = _resolve(_FUNCTIONS[node.target], arguments)
        return name, parameter, in_place, unsupported

    def add_operands(self, node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
        """The two tensors of a plain `a + b` (operator, torch.add, Tensor.add, in place or not), else None."""
        if node in self.taken:
            return None
        if node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add):
            operands = node.args
        elif node.op == "call_method" and node.target in ("add", "add_"):
            operands = node.args
        else:
            return None
        if len(operands) != 2 or node.kwargs or not all(isinstance(a, fx.Node) for a in operands):
            return None
        if operands[0] is operands[1]:
            return None
        in_place = node.target in ("add_", operator.iadd)
        if in_place and not self.only_user(operands[0], node):
            return None
        return operands


def _match(g: _Graph) -> list[Chain]:
    """The chains of the graph, longest first: activation-ended, then add-ended, then BN, conv, linear alone."""
    found: list[Chain] = []

    def take(chain: Chain) -> None:
        found.append(chain)
        g.taken.update(chain.nodes)

    def norm_chain(bn: fx.Node, chain: Chain) -> Chain:
        chain.bn, chain.source = bn, bn.args[0]
        chain.nodes.append(bn)
        if g.conv(bn.args[0]) and g.only_user(bn.args[0], bn):
            chain.conv = bn.args[0]
            chain.source = chain.conv.args[0]
            chain.nodes.append(chain.conv)
        return chain

    def residual_chain(add: fx.Node, chain: Chain) -> Chain | None:
        operands = g.add_operands(add)
        if operands is None:
            return None
        main, residual = operands if g.bn(operands[0]) and g.only_user(operands[0], add) else operands[::-1]
        in_place = add.target in (operator.iadd, "add_")
        if not (g.bn(main) and g.only_user(main, add)) or (in_place and main is not operands[0]):
            return None  # (`residual += bn(...)` keeps the residual's dtype: left to PyTorch)
        chain.add, chain.residual, chain.in_place = add, residual, in_place
        chain.nodes.append(add)
        norm_chain(main, chain)
        if g.bn(residual) and g.only_user(residual, add) and g.conv(residual.args[0]) and \
                g.only_user(residual.args[0], residual):
            shortcut = norm_chain(residual, Chain(source=residual, defer=True))
            take(shortcut)
            chain.residual_bn = residual
        return chain

    def pooled(chain: Chain) -> Chain:
        """The chain with the pool that alone reads its activation, where the kernels take it (a global average,
        or a max-pool without a residual)."""
        node = chain.activation.node
        pool = next(iter(node.users)) if len(node.users) == 1 else None
        if pool is not None and (g.average_pool(pool) or (chain.add is None and g.max_pool(pool))):
            chain.pool = pool
            chain.nodes.append(pool)
        return chain

    for node in list(g.graph.nodes):
        act = g.activation(node)
        if act is None or not g.only_user(act.source, node):
            continue
        chain = Chain(source=act.source, activation=act, nodes=[node])
        if (fused := residual_chain(act.source, chain)) is not None:
            take(pooled(fused))
        elif g.bn(act.source):
            take(norm_chain(act.source, pooled(chain)))
        elif g.conv(act.source) or g.conv1d(act.source) or g.conv_transpose(act.source) or g.linear(act.source):
            kind = "linear" if g.linear(act.source) else "conv"
            setattr(chain, kind, act.source)
            chain.source = act.source.args[0]
            chain.nodes.append(act.source)
            take(chain)
    for node in list(g.graph.nodes):
        if (fused := residual_chain(node, Chain(source=node))) is not None:
            take(fused)
    for node in list(g.graph.nodes):
        if g.bn(node):
            take(norm_chain(node, Chain(source=node)))
    for node in list(g.graph.nodes):
        for kind, matches in (("conv", g.conv), ("conv", g.conv1d), ("conv", g.conv_transpose), ("linear", g.linear)):
            if matches(node):
                take(Chain(source=node.args[0], nodes=[node], **{kind: node}))
        if (act := g.activation(node)) is not None:
            take(Chain(source=act.source, activation=act, nodes=[node]))
        if g.prelu(node):
            take(Chain(source=node.args[0], nodes=[node], prelu=node))
    return found


def _rewrite(g: _Graph, chain: Chain) -> None:
    """Replace the chain's nodes by one call of its `kernels.chains` function."""
    last = max(chain.nodes, key=_position(g.graph))
    module = lambda node: g.graph.get_attr(node.target) if node is not None else None  # noqa: E731
    act = chain.activation
    act_kwargs = {"activation": act.name, "negative_slope": act.negative_slope} if act else {}
    residual = {"residual": g.current(chain.residual)} if chain.residual is not None else {}
    if chain.in_place:
        residual["in_place"] = True
    source = g.current(chain.source)
    with g.graph.inserting_before(last):
        if chain.pool is not None:
            act_kwargs["pool"] = module(chain.pool)
        if chain.residual_bn is not None:  # the shortcut's chain was rewritten first: (raw output, its statistics)
            shortcut = residual["residual"]
            residual["residual"] = g.graph.call_function(operator.getitem, (shortcut, 0))
            residual["residual_stats"] = g.graph.call_function(operator.getitem, (shortcut, 1))
            residual["residual_bn"] = module(chain.residual_bn)
        if chain.bn is not None and chain.conv is not None:
            args, target = (source, module(chain.conv), module(chain.bn)), chains.conv_bn_act
            act_kwargs |= residual | ({"defer": True} if chain.defer else {})
        elif chain.bn is not None:
            args, target = (source, module(chain.bn)), chains.bn_act
            act_kwargs |= residual
        elif chain.prelu is not None:
            args, target = (source, module(chain.prelu)), chains.prelu
        elif chain.conv is not None or chain.linear is not None:
            layer = chain.conv or chain.linear
            target = next(function for kind, function in LAYER_FUNCTIONS.items() if behaves_as(g.module(layer), kind))
            args = (source, module(layer))
        else:
            args, target = (source, act.name, act.negative_slope), chains.activation
            act_kwargs = {}
        replacement = g.graph.call_function(target, args, act_kwargs)
    last.replace_all_uses_with(replacement)
    g.replaced[last] = replacement
    for node in sorted(chain.nodes, key=_position(g.graph), reverse=True):
        g.graph.erase_node(node)


def _position(graph: fx.Graph) -> Callable[[fx.Node], int]:
    order = {node: index for index, node in enumerate(graph.nodes)}
    return lambda node: order[node]


def _link(g: _Graph, chain: Chain, node: fx.Node) -> str:
    if node is chain.add:
        return "+ residual" + (" (its BN fused)" if chain.residual_bn is not None else "")
    if node.op == "call_module":
        return str(node.target)
    if node.op == "call_method":
        return f".{node.target}()"
    return getattr(node.target, "__name__", str(node.target))


def _describe(g: _Graph, chain: Chain) -> SwapRecord:
    """The report line of a chain: its first link's path and type, and the whole chain."""
    nodes = sorted(chain.nodes, key=_position(g.graph))
    head = nodes[0]
    kind = type(g.module(head)).__name__ if head.op == "call_module" else calls.readable(head.op, head.target)
    detail = " -> ".join(_link(g, chain, node) for node in nodes)
    if chain.defer:
        detail += " (normalised inside its consumer's kernel)"
    action = "fused" if len(nodes) > 1 else "swapped"
    return SwapRecord(str(head.target) if head.op == "call_module" else head.name, kind, action, detail)


def trace(model: nn.Module, leaves: tuple[type[nn.Module], ...]) -> fx.GraphModule:
    """`model` traced into a GraphModule that shares its whole module tree (see the module docstring). The
    tensors made in forward, which torch.fx stows on `model`, move to the GraphModule (not in its state_dict)."""
    before = set(vars(model))
    graph = _Tracer(leaves).trace(model)
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    for name in {node.target for node in graph.nodes if node.op == "get_attr"} & (set(vars(model)) - before):
        delattr(model, name)
        gm._non_persistent_buffers_set.add(name)
    for name, child in model.named_children():
        setattr(gm, name, child)
    for name, parameter in model.named_parameters(recurse=False):
        setattr(gm, name, parameter)
    for name, buffer in model.named_buffers(recurse=False):
        gm.register_buffer(name, buffer, persistent=name not in model._non_persistent_buffers_set)
    return gm


def fuse(gm: fx.GraphModule, supported: Callable[[nn.Module], str | None], activations_reason: str | None
         ) -> list[SwapRecord]:
    """Rewrite `gm` (from `trace`) in place: every chain to its kernels.chains call. `supported(module)` says
    why a conv/linear/BN cannot run on the kernels (None: it can); `activations_reason`, if not None, why no
    activation can (activations have no parameters to tell their input's dtype: the model's tell). Returns a
    record per rewritten chain and per node left in PyTorch."""
    g = _Graph(gm, supported, activations_reason)
    found = _match(g)
    records = [_describe(g, chain) for chain in found]
    for chain in sorted(found, key=lambda c: not c.defer):  # a deferred shortcut before its consumer
        _rewrite(g, chain)
    _hand_on_inputs(g)
    _hand_sums_to_readers(g)
    records += _functional_layers(g)
    records += _kept(g)
    gm.graph.lint()
    gm.recompile()
    return records


def _hand_on_inputs(g: _Graph) -> None:
    """Where a conv_bn_act call's input is read again after it (a residual block's input: the shortcut, the
    downsample), the later readers read the input the call hands on (`chains.conv_bn_act(hand_on=True)`), so
    that their gradient of it is added in the conv's dgrad launch instead of by an add of autograd's."""
    for node in list(g.graph.nodes):
        if node.target is not chains.conv_bn_act or node.kwargs.get("defer"):
            continue
        source, position = node.args[0], _position(g.graph)
        later = [user for user in source.users if user is not node and position(user) > position(node)]
        if not later:
            continue
        handed = _item(g, node, 1, {"hand_on": True})
        for user in later:
            user.replace_input_with(source, handed)


def _hand_sums_to_readers(g: _Graph) -> None:
    """Where a conv_bn_act call is the only reader of a BN chain's output and reads it once, as its input (its
    other readers read what the call hands on), and its conv is not depthwise (whose direct dgrad has no such
    epilogue), the chain hands the call what its dgrad launch needs to form the chain's backward sums
    (`hand_sums=True`, `x_chain=`): the chain's backward then runs without its sums launch."""
    for node in list(g.graph.nodes):
        if node.target is not chains.conv_bn_act or node.kwargs.get("defer"):
            continue
        value = node.args[0]
        producer = value.args[0] if value.target is operator.getitem and _returns_tuple(value.args[0]) and \
            value.args[1] == 0 else value
        conv = g.gm.get_submodule(node.args[1].target)
        if producer.target not in (chains.conv_bn_act, chains.bn_act) or producer.kwargs.get("defer") or \
                producer.kwargs.get("pool") is not None or list(value.users) != [node] or \
                _reads(node, value) != 1 or is_depthwise(conv.in_channels, conv.out_channels, conv.groups):
            continue
        chain = _item(g, producer, -1, {"hand_sums": True})  # (before reading node.kwargs: it may rewrite them)
        node.kwargs = {**node.kwargs, "x_chain": chain}


def _reads(node: fx.Node, value: fx.Node) -> int:
    """How many of `node`'s arguments are `value`."""
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda arg: found.append(arg) or arg)
    return sum(arg is value for arg in found)


def _returns_tuple(node: fx.Node) -> bool:
    """Whether a rewritten chain call returns a tuple (its value and what it hands on) rather than its value."""
    return node.op == "call_function" and (node.kwargs.get("hand_on") or node.kwargs.get("hand_sums")) is True


def _item(g: _Graph, node: fx.Node, index: int, flag: dict[str, bool]) -> fx.Node:
    """A getitem node of item `index` of the tuple that chain call `node` returns once given `flag` (its readers
    of a plain value, if it returned one, now read item 0)."""
    if not _returns_tuple(node):
        with g.graph.inserting_after(node):
            value = g.graph.call_function(operator.getitem, (node, 0))
        node.replace_all_uses_with(value, delete_user_cb=lambda user: user is not value)
    node.kwargs = {**node.kwargs, **flag}
    item = next((user for user in node.users if user.args[1:] == (index,)), None)
    if item is None:
        with g.graph.inserting_after(node):
            item = g.graph.call_function(operator.getitem, (node, index))
    return item


def _functional_layers(g: _Graph) -> Iterable[SwapRecord]:
    """Retarget F.conv2d / torch.conv2d / F.linear calls left in the graph to the kernels' ops (same arguments),
    where the module owning the weight (if it is a get_attr) is supported, else where the model's parameters
    are: their dtype is not known from the graph."""
    for node in list(g.graph.nodes):
        if node.op != "call_function" or node.target not in FUNCTIONAL_LAYERS:
            continue
        name, kind = node.target.__name__, calls.readable(node.op, node.target)
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        owner = g.owner(weight)
        reason = g._activations_reason if owner is None else g._supported(owner)
        if reason is None and set(node.kwargs) <= {"bias", "stride", "padding", "dilation", "groups"}:
            node.target = FUNCTIONAL_LAYERS[node.target]
            yield SwapRecord(node.name, kind, "swapped", f"{name} on the Triton kernels")
        else:
            yield SwapRecord(node.name, kind, "kept", reason or "called with keyword arguments the op names otherwise")


def _kept(g: _Graph) -> Iterable[SwapRecord]:
    """What stays in PyTorch: unsupported layers (with why), modules of kinds the kernels do not run, and
    conv/matmul/normalisation/activation calls the pass does not rewrite (`calls.left_in_pytorch`)."""
    for node in g.graph.nodes:
        if node.op != "call_module":
            reason = g.kept.get(node) or calls.left_in_pytorch(node.op, node.target)
            if reason is not None:
                yield SwapRecord(node.name, calls.readable(node.op, node.target), "kept", reason)
            continue
        module = g.module(node)
        reason = g.kept.get(node) or (_NO_POOL_CHAIN if isinstance(module, nn.MaxPool2d) else
                                      NO_KERNEL if not isinstance(module, nn.Identity) else None)
        if reason is not None:
            yield SwapRecord(str(node.target), type(module).__name__, "kept", reason)
