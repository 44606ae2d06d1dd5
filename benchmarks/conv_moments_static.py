"""The conv forward with and without its BatchNorm-statistics epilogue (swap's conv -> BN chains in training:
the tile moments, then the last program of each channel block merges them and updates the running stats),
compiled for sm_90 and sm_80 as the launch specialises it, for three ResNet-18 layers (batch 64, fp16
channels_last, default configs): registers, spills and the static ceilings. Static estimates from compiled
code, not speeds. No GPU needed: TRITON_INTERPRET=0 python benchmarks/conv_moments_static.py"""
import dataclasses
from triton_workbench.kernels import aot, ceilings, tuned
from triton_workbench.kernels.batch_norm import Running
from triton_workbench.kernels.conv_fwd import CONV_FWD_SPEC, conv2d_forward
from triton_workbench.kernels.conv_geometry import ConvGeometry, conv_problem

def launch_moments(inputs, config):
    return conv2d_forward(inputs["x"], inputs["weight"], inputs["bias"], inputs["geometry"], None, config=config,
                          statistics=Running(None, None, None, 0.1, 1e-5)).y

layers = {"layer1 3x3 64": (64, 64, 56, 56, 64, 3, 1, 1), "layer3 3x3 256": (64, 256, 14, 14, 256, 3, 1, 1),
          "layer2 3x3/2 128": (64, 64, 56, 56, 128, 3, 2, 1)}
for arch in (90, 80):
    for name, (n, c, h, w, co, k, s, p) in layers.items():
        problem = conv_problem(n, c, h, w, co, k, k, ConvGeometry(s, s, p, p, p, p, 1, 1, 1), "fp16", "nhwc", None, False)
        config = tuned.config_for(CONV_FWD_SPEC, problem)
        for label, spec in (("plain", CONV_FWD_SPEC), ("stats", dataclasses.replace(CONV_FWD_SPEC, launch=launch_moments))):
            launches = aot.compile_launches(spec, problem, config, arch)
            ceiling = ceilings.static_ceilings(spec, problem, launches, arch)
            c0 = launches[0]
            print(f"sm_{arch} {name:18s} {label:8s} regs {c0.registers:4d} spills {c0.spills:3d} "
                  f"ceilings {ceiling}", flush=True)
