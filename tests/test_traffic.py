"""The traffic model of a training step (workbench.traffic) and `workbench bench model --traffic`."""

import collections

import pytest

import torch
from torch import nn

from triton_workbench.database import Database, SeriesTable
from triton_workbench.kernels.nn import swap
from triton_workbench.workbench.cli import main
from triton_workbench.workbench.traffic import block_table, step_kernels, traffic_table
from triton_workbench.workbench.torchvision_resnet import BasicBlock


def _block() -> nn.Module:
    """A stem (conv-BN-ReLU) and a downsampling BasicBlock: the block's input needs its gradient."""
    return nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         BasicBlock(8, 16, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


def test_eager_counts_pytorchs_own_kernels():
    kernels = step_kernels(_block(), (4, 8, 12, 12), torch.float16)
    names = collections.Counter(kernel.name for kernel in kernels)
    assert names["bn statistics"] == names["bn transform"] == 4  # four BNs, two kernels each way
    assert names["bn backward reduce"] == names["bn backward elementwise"] == 4
    assert names["dgrad"] == 3 and names["wgrad"] == 4 and names["aten::convolution"] == 4  # no dgrad of the input
    assert names["aten::relu"] + names["aten::relu_"] == names["aten::threshold_backward"] == 3
    conv = [k for k in kernels if k.name == "aten::convolution"][1]  # the block's first conv, stride 2
    assert conv.bytes == 2 * (4 * 8 * 12 * 12 + 16 * 8 * 3 * 3 + 4 * 16 * 6 * 6)  # x + weight + y, in fp16


def test_the_swapped_block_runs_its_own_launchers_and_moves_fewer_bytes():
    eager = step_kernels(_block(), (4, 8, 12, 12), torch.float16)
    ours = step_kernels(swap(_block()), (4, 8, 12, 12), torch.float16)
    names = collections.Counter(kernel.name for kernel in ours)
    assert names["conv2d_fwd_kernel"] == 4 and not names["aten::pad"]
    assert not names["partial_moments_kernel"] and not names["finalize_kernel"]  # every BN's statistics: its conv's
    assert names["normalize_kernel"] == 2  # the downsample's BN is normalised inside the block's last kernel,
    assert names["normalize_average_kernel"] == 1  # which also averages the output: AdaptiveAvgPool2d(1) in it
    assert names["conv2d_dgrad_kernel"] == 3  # one launch per conv, a stride-2 one's four phases in it
    assert names["conv2d_wgrad_kernel"] == 4 and not names["aten::sum"]  # split-K partials summed in the launch
    assert not names["aten::add"]  # the block input's two gradients (conv1's, the downsample's) summed in a dgrad
    assert not [k for k in ours if "relu" in k.name or k.name.startswith("bn ") or k.name == "activation_kernel"]
    table = traffic_table(eager, ours).set_index("category")
    assert table.loc["activation", "launches_triton"] == 0 and table.loc["activation", "launches_eager"] == 6
    assert table.loc["total", "gb_triton"] < table.loc["total", "gb_eager"]
    assert table.loc["total", "launches_eager"] == len(eager) and table.loc["total", "launches_triton"] == len(ours)
    blocks = block_table(eager, ours).set_index("block")
    assert {"0", "1", "3"} <= set(blocks.index)  # the stem conv, its BN, the BasicBlock (3.conv1, 3.downsample.0)
    assert blocks["gb_eager"].sum() == pytest.approx(table.loc["total", "gb_eager"])  # every kernel in one block
    assert blocks.loc["3", "launches_triton"] > blocks.loc["0", "launches_triton"]


def test_bench_model_prints_and_stores_the_table_and_the_fused_chains(tmp_path, capsys):
    db_path = tmp_path / "w.db"
    assert main(["bench", "model", "demo", "--traffic", "--per-block", "--batch", "8", "--db", str(db_path)]) == 0
    out = capsys.readouterr().out
    assert "analytic model" in out and "swapped / eager:" in out and "batch norm" in out
    assert "blocks.0" in out and "the totals are exact" in out
    db = Database(db_path)
    run_id = int(db.runs()["run_id"].iloc[-1])
    assert set(db.read(SeriesTable.TRAFFIC, run_id)["category"]) >= {"total", "conv forward", "batch norm"}
    chains = db.read(SeriesTable.FUSED_CHAINS, run_id)
    assert (chains["action"] == "fused").sum() >= 6 and "stem.0 -> stem.1 -> stem.2" in set(chains["detail"])
    db.close()
    assert main(["report", "--all", "-o", str(tmp_path / "report.html"), "--db", str(db_path)]) == 0
    html = (tmp_path / "report.html").read_text()
    assert "Fusion: what the swapped model runs" in html and "stem.0 -&gt; stem.1 -&gt; stem.2" in html


def test_bench_model_refuses_an_unknown_model_and_traffic_belongs_to_bench_model(capsys):
    assert main(["bench", "model", "vgg", "--traffic"]) == 2
    assert "resnet18, resnet50, demo" in capsys.readouterr().err
    assert main(["bench", "gemm", "--traffic"]) == 2
