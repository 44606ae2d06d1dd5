"""Static ceilings (kernels/ceilings.py) and `workbench inspect`: the models on hand-made loops, the hardware
rates they read against the published peaks, and one real compile of a GEMM for sm_80 and sm_90."""

import json

import pytest

from triton_workbench import kernels
from triton_workbench.autotune import TuningDatabase, TuningKey
from triton_workbench.kernels import ceilings, hardware, sass
from triton_workbench.workbench.cli import main
from triton_workbench.workbench.commands.inspect import _top_configs, table
from triton_workbench.workbench.tables import format_table


def _loop(*opcodes: str) -> sass.Loop:
    return sass.Loop(tuple(sass.Instruction(16 * index, opcode) for index, opcode in enumerate(opcodes)))


def test_tensor_issue_model():
    # sm_90, 8 warps = 2 warpgroups, each issuing 2 HGMMA m64n128k16: 2 * 2 * 131072 FMAs at 2048 per clock
    hopper = _loop("HGMMA.64x128x16.F32", "HGMMA.64x128x16.F32", *["IADD3"] * 80)
    model = ceilings.tensor_issue(hopper, hardware.HOPPER, warps=8)
    assert (model.tensor_clocks, model.issue_clocks, model.ceiling) == (256, 82 * 8 / 4, 1.0)
    # sm_80, 4 warps each issuing one bf16 HMMA m16n8k16 (2048 FMAs at 1024 per clock) among 41 instructions
    ampere = _loop("HMMA.16816.F32.BF16", *["LOP3"] * 40)
    model = ceilings.tensor_issue(ampere, hardware.AMPERE_A100, warps=4)
    assert (model.tensor_clocks, model.issue_clocks) == (8, 41)
    assert model.ceiling == pytest.approx(8 / 41)
    tf32 = ceilings.tensor_issue(_loop("HMMA.1688.F32.TF32"), hardware.AMPERE_A100, warps=4)
    assert tf32.tensor_clocks == 4 * 1024 / 512
    assert ceilings.tensor_issue(_loop("HMMA.16816.F32"), hardware.Architecture(0, "none", shared_bytes_per_block=0), warps=4) is None


def test_ctas_per_sm_takes_the_tightest_limit():
    assert ceilings.ctas_per_sm(hardware.HOPPER, registers=119, shared_bytes=48 * 1024, warps=8) == 2  # registers
    assert ceilings.ctas_per_sm(hardware.AMPERE_A100, registers=174, shared_bytes=32 * 1024, warps=8) == 1
    assert ceilings.ctas_per_sm(hardware.HOPPER, registers=32, shared_bytes=100 * 1024, warps=4) == 2  # shared
    assert ceilings.ctas_per_sm(hardware.HOPPER, registers=16, shared_bytes=0, warps=1) == 32  # blocks


def test_memory_ceiling_is_the_roofline_fraction_of_peak():
    assert ceilings.memory_ceiling(flops=1e12, bytes_moved=1e9, peak_tflops=1.0, bandwidth_gbps=1.0) == 1.0
    assert ceilings.memory_ceiling(flops=1e12, bytes_moved=4e9, peak_tflops=1.0, bandwidth_gbps=1.0) == 0.25


def test_tensor_rates_match_the_published_peaks():
    """peak = 2 x rate x SMs x clock: every known GPU's tensor peaks imply a boost clock of 1.3 to 2.6 GHz."""
    for gpu in hardware.GPUS:
        rates = gpu.architecture.tensor_fma_per_clock
        for label, peak in gpu.compute_tflops.items():
            rate = rates.get("tf32") if label.startswith("TF32") else rates.get("fp16") if "FP16" in label else None
            if rate is not None:
                clock_ghz = peak * 1e12 / (2 * rate * gpu.sm_count) / 1e9
                assert 1.3 < clock_ghz < 2.6, (gpu.name, label, clock_ghz)
    assert hardware.reference_gpu(90) is hardware.H100_SXM and hardware.reference_gpu("8.6") is hardware.A10
    assert hardware.peak_label("bf16") == "FP16/BF16 tensor" and hardware.peak_label("fp32", tf32=True) == "TF32 tensor"


def test_inspect_compiles_a_gemm_for_sm80_and_sm90_and_reads_its_sass(capsys):
    config = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}
    assert main(["inspect", "gemm", "--shape", "256,512,1024", "--dtype", "fp16", "--activation", "gelu",
                 "--config", json.dumps(config), "--arch", "90", "80", "--workers", "2", "--json"]) == 0
    sm90, sm80 = json.loads(capsys.readouterr().out)
    for report in (sm90, sm80):
        assert report["ok"] and report["registers"] > 0 and report["spill_bytes"] == 0 and report["shared_bytes"] > 0
        assert (report["launch"], report["launches"]) == (1, 1)
        assert report["ctas"] == 4 * 8 and report["grid"] == [32, 1, 1] and report["ctas_per_sm"] >= 1
        # cp.async of the 64x32 A and 32x64 B fp16 tiles: 4 KiB each over 128 threads, two 16-byte copies apiece
        assert report["loop"]["global_loads"] == {"LDGSTS.128": 4}
        assert 0 < report["tensor_issue_ceiling"] <= 1 and 0 < report["memory_ceiling"] <= 1
        assert report["specialisation"]["constants"]["stride_ak"] == 1  # as the launch specialises it
        assert "M" in report["specialisation"]["attributes"]
    # one warpgroup: each iteration its two HGMMA m64n64k16 do the 64x64x32 tile; 4 warps of HMMA m16n8k16 on sm_80
    assert sm90["loop"]["mma"] == [{"opcode": "HGMMA.64x64x16.F32", "count": 2, "shape": "m64n64k16 fp16"}]
    assert sm90["tensor_clocks_per_iteration"] == 64 * 64 * 32 / 2048
    assert sm80["loop"]["mma"][0]["opcode"] == "HMMA.16816.F32"
    assert sum(m["count"] for m in sm80["loop"]["mma"]) * 4 * 16 * 8 * 16 == 64 * 64 * 32
    assert (sm90["gpu"], sm80["gpu"]) == ("H100 SXM", "A100 80GB SXM")
    text = format_table(table([sm90, sm80, {**sm80, "config": config | {"GROUP_M": 1}, "ok": False,
                                            "reason": "SomeError: x"}]))
    for expected in ("sm_90 #1", "sm_80 #2", "HGMMA.64x64x16.F32 x2 (m64n64k16 fp16)", "tensor/issue ceiling",
                     "LDGSTS.128 x4", "failed: SomeError: x"):
        assert expected in text


def test_inspect_top_configs_come_from_the_database(tmp_path, capsys):
    spec = kernels.SPECS["gemm"]
    problem = dict(spec.example_problems[1])
    path = tmp_path / "tuned.db"
    database = TuningDatabase(path)
    run = database.start_run("tune", "gemm")
    configs = [dict(spec.default_config(problem), BLOCK_K=block_k) for block_k in (32, 64)]
    key = TuningKey.of(spec, problem)
    database.record_trial(run, key, configs[0], "ok", time_ms=2.0)
    database.record_trial(run, key, configs[1], "ok", time_ms=1.0)
    database.record_trial(run, key, dict(configs[0], num_stages=4), "wrong", "off", time_ms=0.5)
    database.close()
    assert _top_configs(spec, problem, 5, str(path)) == [configs[1], configs[0]]
    assert main(["inspect", "gemm", "--dtype", "fp32", "--top", "1", "--db", str(path)]) == 2
    assert "no successful trials of gemm" in capsys.readouterr().err
    assert main(["inspect", "gemm", "--top", "1", "--db", str(tmp_path / "none.db")]) == 2
    assert "there is no database at" in capsys.readouterr().err and not (tmp_path / "none.db").exists()
