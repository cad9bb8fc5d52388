"""Every kernel compiles for sm_80 and sm_90 as the JIT would launch it at GPT-2's shapes, checked
without a GPU.

The compile check (tools/compile_check.py) runs each lesson's COMPILE_SPECS calls on CPU tensors
with Triton's launch intercepted, specialises every launch with Triton's own binder, lowers it to
a cubin with the ptxas in Triton's wheel, and reads registers, spills, shared memory and the
instruction mix. Here:

* the plan (no compiles): every lesson lists COMPILE_SPECS, every `*_kernel` it defines is launched
  by one of them, and the launches carry the JIT's specialisation (unit strides folded to the
  constant 1, sequence lengths divisible by 16 marked so at T = 1024 and not at a 7-token prompt);
* each lesson's first spec (bf16 training at gpt2-124M's shapes; of an autotuned launch its first
  config), on both targets, compiles with no spills, within shared memory and registers (every
  spec and config with COMPILE_CHECK_FULL=1, or `python scripts/compile_report.py`);
* the check's own logic (cuobjdump parsing, the limits, residency, instruction counts) on small
  fabricated inputs.
"""

import os

import pytest

from tools.compile_check import (
    PTX_PATTERNS,
    TARGETS,
    count_instructions,
    judge,
    kernel_modules,
    list_variants,
    parse_resource_usage,
    residency,
    run_check,
    tensor_core_verdict,
)

FULL = os.environ.get("COMPILE_CHECK_FULL", "0") == "1"


@pytest.fixture(scope="module")
def plan():
    return list_variants()


@pytest.fixture(scope="module")
def report():
    # 2 workers: this project's CI machine has 2 cores. 300 s per compile: a healthy kernel takes
    # seconds; one that spills kilobytes of registers keeps ptxas busy for minutes, and fails anyway.
    # In CI: each lesson's first spec, and of each autotuned launch the autotuner's first config.
    return run_check(workers=2, first_spec_only=not FULL, timeout=300,
                     env=None if FULL else {"GPT_TRITON_MAX_CONFIGS": "1"})


@pytest.mark.slow
def test_every_lesson_lists_specs_that_launch_every_kernel(plan):
    assert set(plan["counts"]) == set(kernel_modules())
    assert not plan["problems"], "\n".join(f"{r.status} {r.module} {r.kernel}: {r.error}" for r in plan["problems"])
    for module in kernel_modules():
        assert {v["target"] for v in plan["variants"] if v["module"] == module} == set(TARGETS), module


@pytest.mark.slow
def test_launches_carry_the_jits_specialisation(plan):
    fwd = [v for v in plan["variants"] if v["kernel"] == "_flash_attention_fwd_kernel" and v["dtype"] == "bf16"]
    train = [v for v in fwd if any(".train." in s for s in v["specs"])]
    prefill = [v for v in fwd if any(".prefill." in s for s in v["specs"])]
    assert train and prefill
    for v in train + prefill:
        assert v["specialisation"]["stride_qd"] == "=1"  # the head dim is contiguous: the constant 1
        assert v["specialisation"]["stride_qt"] == "i32:16"  # 3 * C, a multiple of 16
    assert all(v["specialisation"]["Tq"] == "i32:16" for v in train)  # T = 1024
    assert all(v["specialisation"]["Tq"] == "i32" for v in prefill)  # T = 7
    # GPT-2's head dims and the padded ones are all compiled
    assert {int(v["config"].split("HEAD_DIM=")[1].split()[0]) for v in train} == {64, 80, 96, 128}
    # the 124M and 355M calls specialise alike (every int a multiple of 16): one variant, both listed
    assert any({".gpt2-124M", ".gpt2-355M"} <= {s[s.rindex("."):] for s in v["specs"]} for v in train)


@pytest.mark.slow
@pytest.mark.parametrize("module", kernel_modules())
def test_compiles_within_limits(report, module):
    mine = [r for r in report.results if r.module == module]
    assert mine, f"no compile results for {module}"
    assert {r.target for r in mine if r.config} == set(TARGETS)
    failures = [r for r in mine if not r.ok]
    assert not failures, f"{len(failures)} of {len(mine)} failed:\n" + "\n".join(
        f"  {r.kernel} [{r.config}] {r.target}: {r.status} {r.error}" for r in failures
    )
    for r in mine:
        assert r.registers > 0 and r.blocks_per_sm >= 1 and r.warps_per_sm == r.blocks_per_sm * r.num_warps
        assert r.ptx["ld_global"] > 0, (r.kernel, "a kernel that loads nothing?")


# ----------------------------------------------------------------------------------------------
# The check's own logic, on fabricated inputs (no compiles).
# ----------------------------------------------------------------------------------------------
CUOBJDUMP_OUTPUT = """
Resource usage:
 Common:
  GLOBAL:0
 Function _other_kernel:
  REG:32 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:400 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _my_kernel:
  REG:168 STACK:8 SHARED:16 LOCAL:4 CONSTANT[0]:488 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_parse_resource_usage():
    usage = parse_resource_usage(CUOBJDUMP_OUTPUT, "_my_kernel")
    assert (usage["REG"], usage["STACK"], usage["SHARED"], usage["LOCAL"]) == (168, 8, 16, 4)
    with pytest.raises(RuntimeError, match="no resource usage"):
        parse_resource_usage(CUOBJDUMP_OUTPUT, "_absent_kernel")


def test_judge_limits():
    clean = {"REG": 64, "STACK": 0, "SHARED": 0, "LOCAL": 0}
    assert judge(clean, 40_000, 4, "sm_80") == (64, 0, 40_000, [])
    # 200,000 B fits an H100's 227 KB but not an A100's 163 KB
    assert judge(clean, 200_000, 4, "sm_90")[3] == []
    assert "shared memory" in judge(clean, 200_000, 4, "sm_80")[3][0]
    spilled = judge({**clean, "STACK": 24}, 0, 4, "sm_90")
    assert spilled[1] == 24 and "spill" in spilled[3][0]
    # 200 registers x 16 warps x 32 threads > 64K registers per SM: the block could not launch
    assert "per SM" in judge({**clean, "REG": 200}, 0, 16, "sm_90")[3][0]


def test_residency_as_the_fused_softmax_tutorial_counts_it():
    # 128 regs x 32 x 8 warps = 32K: 2 blocks by registers; 40 KB of smem would allow 5 on sm_90
    assert residency(128, 40_000, 8, "sm_90") == (2, "registers")
    # 32 regs x 4 warps: registers allow 16 blocks, warps 16 too, 100 KB of smem only 2 (sm_90), 1 (sm_80)
    assert residency(32, 100_000, 4, "sm_90") == (2, "shared")
    assert residency(32, 100_000, 4, "sm_80") == (1, "shared")
    assert residency(16, 0, 2, "sm_90") == (32, "warps")  # 64 warps / 2 = 32 = the block limit too


def test_instruction_counts_and_tensor_core_verdict():
    ptx = """
    mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f1};
    cp.async.cg.shared.global [ %r3 + 0 ], [ %rd4 + 0 ], 0x10, %r5;
    ld.global.v4.b32 { %r6, %r7, %r8, %r9 }, [ %rd1 + 0 ];
    @%p1 ld.global.L1::evict_last.v2.b32 { %r1, %r2 }, [ %rd2 + 0 ];
    ld.global.b32 %r10, [ %rd3 + 0 ];
    """
    counts = count_instructions(ptx, PTX_PATTERNS)
    assert (counts["mma"], counts["wgmma"], counts["cp_async"], counts["tma"]) == (1, 0, 1, 0)
    assert (counts["ld_global"], counts["ld_global_v4"], counts["ld_global_v2"]) == (3, 1, 1)
    assert tensor_core_verdict("%0 = tt.dot %a, %b", counts, "sm_80") == ("mma", "")
    assert tensor_core_verdict("%0 = tt.dot %a, %b", counts, "sm_90")[0] == "mma"  # but not wgmma: noted
    assert tensor_core_verdict("tt.load", counts, "sm_90")[0] == ""  # no dot at all
    none = dict(counts, mma=0)
    # as Triton 3.9 prints an fp32 dot with input_precision="ieee": no inputPrecision attribute
    fp32 = "%c_12 = tt.dot %a_7, %b_11, %c : tensor<16x16xf32> * tensor<16x16xf32> -> tensor<16x16xf32> loc(#loc15)"
    assert tensor_core_verdict(fp32, none, "sm_90") == ("none", tensor_core_verdict(fp32, none, "sm_80")[1])
    assert "ieee" in tensor_core_verdict(fp32, none, "sm_90")[1]
    tf32 = fp32.replace("%c :", "%c, inputPrecision = tf32 :")
    assert "ieee" not in tensor_core_verdict(tf32, none, "sm_90")[1]


def test_a_broken_module_is_reported_not_raised(tmp_path):
    rep = run_check(modules=("no_such_kernel",), workers=1)
    assert rep.modules == {"no_such_kernel": None}
    [row] = rep.failures
    assert row.status == "IMPORT ERROR" and "no_such_kernel" in row.error


@pytest.mark.slow
def test_budget_mode_keeps_the_first_config_of_each_autotuned_launch(plan):
    spec = "flash_attention.train.bf16.d64.gpt2-124M"

    def fwd_configs(variants):
        return [v["config"] for v in variants if v["kernel"] == "_flash_attention_fwd_kernel"
                and spec in v["specs"] and v["target"] == "sm_90"]

    everything = fwd_configs(plan["variants"])
    assert len(everything) > 1  # the autotuner has several configs to choose from here
    budget = fwd_configs(list_variants(kernel=spec, env={"GPT_TRITON_MAX_CONFIGS": "1"})["variants"])
    assert budget == everything[:1]
