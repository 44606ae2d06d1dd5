"""The conv dgrad with and without its BN-chain sums epilogue (swap's BN chain -> conv in training: the reading
conv's dgrad forms the chain's backward sums, `conv2d_input_grad_with_sums`), compiled for sm_90 and sm_80 as
the launch specialises it, for every ResNet-18 dgrad (batch 64, fp16 channels_last, default configs): registers,
spills, the innermost MMA loop's instructions and the static tensor/issue ceiling. "sums2": a chain without a
normalised residual (BN -> ReLU, or + an identity shortcut: two sums); "sums3": with one (a downsample's BN:
three sums, the heaviest epilogue). Static estimates from compiled code, not speeds. No GPU needed:
TRITON_INTERPRET=0 python benchmarks/dgrad_sums_static.py"""
import dataclasses

import torch

from triton_workbench.kernels import aot, ceilings, hardware
from triton_workbench.kernels.batch_norm import ChainSums, Norm
from triton_workbench.kernels.conv_dgrad import CONV_DGRAD_SPEC, conv2d_input_grad_with_sums
from triton_workbench.workbench.conv_bench import RESNET18_CONV_SHAPES, resnet18_problem


def with_sums(normalised_residual: bool):
    """CONV_DGRAD_SPEC launching with a ReLU chain's sums, the chain's tensors made like x."""
    def launch(inputs, config):
        x = inputs["x"]
        channel = lambda: torch.empty(x.shape[1], device=x.device)  # noqa: E731
        norm = lambda: Norm(channel(), channel(), channel(), channel(), True)  # noqa: E731
        residual = torch.empty_like(x) if normalised_residual else None
        chain = ChainSums(None, torch.empty_like(x), norm(), residual, norm() if normalised_residual else None,
                          "relu", 0.0)
        return conv2d_input_grad_with_sums(inputs["grad_output"], inputs["weight"], x, inputs["geometry"], chain,
                                           config=config)[0]
    return dataclasses.replace(CONV_DGRAD_SPEC, launch=launch)


def main() -> None:
    variants = {"plain": CONV_DGRAD_SPEC, "sums2": with_sums(False), "sums3": with_sums(True)}
    for arch in (90, 80):
        for shape in RESNET18_CONV_SHAPES[1:]:  # the stem's input needs no gradient
            problem = resnet18_problem(shape, batch=64) | {"activation": None, "bias": False}
            config = CONV_DGRAD_SPEC.default_config(problem)
            for label, spec in variants.items():
                for launch in aot.compile_launches(spec, problem, config, arch):
                    report = ceilings.inspect(CONV_DGRAD_SPEC, problem, config, arch, launch,
                                              hardware.reference_gpu(arch))
                    loop = report.get("loop") or {}
                    print(f"sm_{arch} {shape['name']:20s} {label:6s} regs {report['registers']:4d} spills "
                          f"{report['spill_bytes']:3d} loop {loop.get('instructions', '-'):>4} ceiling "
                          f"{report.get('tensor_issue_ceiling')}", flush=True)


if __name__ == "__main__":
    main()
