"""scripts/gpu_session.py's own logic on fabricated inputs: the compile-cost estimate and the config
pruning it chooses, and the report's verdicts against the targets. (The session itself needs a GPU;
`ALLOW_CPU=1 python scripts/gpu_session.py` tries it end to end on a CPU.)"""

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "gpu_session.py"
_spec = importlib.util.spec_from_file_location("gpu_session", _PATH)
gs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gs)


def _row(kernel, config, secs, target="sm_90", specs=("flash_attention.train.bf16.d64.gpt2-124M",), dtype="bf16"):
    return {"kernel": kernel, "config": config, "target": target, "dtype": dtype, "specs": list(specs),
            "specialisation": {"Tq": "i32:16"}, "compile_s": secs}


REPORT = {"cpu": "test", "workers": 2, "commit": "abc", "results": [
    # one autotuned launch with three configs (in the autotuner's order), one untuned kernel
    _row("_fwd", "HEAD_DIM=64 BLOCK_M=64 BLOCK_N=64 w4 s2", 10.0),
    _row("_fwd", "HEAD_DIM=64 BLOCK_M=64 BLOCK_N=64 w4 s3", 20.0),
    _row("_fwd", "HEAD_DIM=64 BLOCK_M=128 BLOCK_N=64 w8 s2", 40.0),
    _row("_fwd", "HEAD_DIM=128 BLOCK_M=64 BLOCK_N=64 w4 s2", 15.0),  # another head dim: its own group
    _row("_pre", "HEAD_DIM=64 BLOCK_M=64 w4 s3", 1.0),
    _row("_fwd", "HEAD_DIM=64 BLOCK_M=64 BLOCK_N=64 w4 s2", 99.0, target="sm_80"),  # not counted for sm_90
]}


def test_compile_estimate_keeps_the_first_configs_of_each_launch():
    assert gs.compile_estimate(REPORT, None) == (5, 86.0)
    assert gs.compile_estimate(REPORT, 2) == (4, 46.0)
    assert gs.compile_estimate(REPORT, 1) == (3, 26.0)
    fp32 = {**REPORT, "results": REPORT["results"] + [_row("_fwd", "HEAD_DIM=64 BLOCK_M=16 w8 s2", 50.0, dtype="fp32",
                                                           specs=("flash_attention.train.fp32.d64.gpt2-124M",))]}
    assert gs.compile_estimate(fp32, None)[0] == 5  # fp32 is not benched: not in the budget run's estimate
    assert gs.compile_estimate(fp32, None, select=None)[0] == 6


def test_benched_specs_are_the_budget_runs_shapes():
    assert gs.benched("flash_attention.train.bf16.d64.gpt2-124M")
    assert gs.benched("flash_attention.prefill.bf16.d64")
    assert gs.benched("decode_attention.step.bf16.gpt2-124M.b1.tq1")
    assert gs.benched("layer_norm.train.bf16.gpt2-124M")
    assert not gs.benched("flash_attention.train.bf16.d80.1280-wide/16 heads")
    assert not gs.benched("decode_attention.step.bf16.gpt2-124M.b8.tq1")
    assert not gs.benched("bias_gelu.train.fp32.gpt2-124M")


def test_pruning_picks_the_most_configs_that_fit():
    # COMPILE_SHARE of the budget: 0.2 * 500 = 100 s fits everything, 0.2 * 300 = 60 s two configs
    assert gs.COMPILE_SHARE == 0.2
    assert gs.choose_max_configs(500, REPORT)[0] is None
    assert gs.choose_max_configs(300, REPORT)[0] == 2
    assert gs.choose_max_configs(150, REPORT)[0] == 1
    n, lines = gs.choose_max_configs(100, REPORT)  # not even one fits: one, and it says so
    assert n == 1 and any("does not fit" in ln for ln in lines)
    assert gs.choose_max_configs(300, None)[0] == 1  # no report: the safe choice


def _bench(**info):
    return {"extra_info": info}


def test_report_judges_the_targets():
    ceilings = {"copy_gbs": 4000.0, "matmul_bf16_tflops": 700.0}
    benches = [
        _bench(kernel="attention", **{"pass": "fwd"}, size=4096, impl="triton", value=320.0, median_ms=1.0, vs_sdpa=1.1),
        _bench(kernel="attention", **{"pass": "fwd+bwd"}, size=4096, impl="triton", value=200.0, median_ms=3.5,
               vs_sdpa=0.9),
        _bench(kernel="layer_norm", **{"pass": "fwd"}, size=768, impl="triton", value=3000.0, median_ms=0.1, x_label="C",
               **{"vs_F.layer_norm": 1.2}),
        _bench(kernel="cross_entropy", **{"pass": "fwd+bwd"}, size=8192, impl="triton", value=2000.0, median_ms=1.0,
               vs_eager=2.5, peak_extra_mb=800.0),
        _bench(bench="train", impl="fused", tokens_per_s=1e5, vs_torch=0.9, model_tflops=100.0),
        _bench(decode="cuda_graph", impl="fused", batch=1, tokens_per_s=3500.0),
    ]
    rows = {r[0]: r for r in gs.judge(benches, ceilings)}
    fwd = rows["attention fwd T=4096: >= 1.0x SDPA, >= 300 TFLOP/s"]
    assert fwd[3] == "PASS" and fwd[2] == "46%"  # 320 / 700
    # backward alone: 2.5 x the forward's FLOPs (320 TFLOP/s x 1 ms) in 3.5 - 1 = 2.5 ms = 320 TFLOP/s
    bwd = rows["attention bwd T=4096: >= 250 TFLOP/s"]
    assert bwd[3] == "PASS" and bwd[1].startswith("320 TFLOP/s")
    assert rows["layer_norm fwd C=768: >= 80% of copy bandwidth"][3] == "MISS"  # 3000 / 4000 = 75%
    ce = next(r for k, r in rows.items() if k.startswith("cross_entropy fwd+bwd N=8192"))
    assert ce[3] == "PASS"  # 2.5x eager, 800 MiB extra = the (8192, 50257) bf16 gradient itself
    assert rows["training step gpt2-124M bf16: fused faster than PyTorch"][3] == "MISS"
    assert rows["decode batch 1, fused, cuda_graph: >= 3000 tokens/s"][3] == "PASS"
    assert rows["attention fwd T=1024"][3] == "not measured"


@pytest.mark.parametrize("extra_mb,verdict", [(800.0, "PASS"), (2000.0, "MISS")])
def test_cross_entropy_extra_buffer_is_judged(extra_mb, verdict):
    benches = [_bench(kernel="cross_entropy", **{"pass": "fwd+bwd"}, size=8192, impl="triton", value=1.0,
                      median_ms=1.0, vs_eager=3.0, peak_extra_mb=extra_mb)]
    [ce] = [r for r in gs.judge(benches, {}) if r[0].startswith("cross_entropy")]
    assert ce[3] == verdict
