"""Every kernel compiles for sm_80 and sm_90 within the GPU's limits, checked without a GPU.

The compile check (kernels/compile_check.py) lowers each CompileSpec configuration to a cubin with
the ptxas in Triton's wheel and reads registers, spills and shared memory from it. Here:

* every kernel module exists and lists COMPILE_SPECS (a missing one fails, it is not skipped);
* every spec, on both targets, compiles with no spills and within shared memory and registers:
  each spec's FIRST configuration (the launcher's default) in CI, every configuration with
  COMPILE_CHECK_FULL=1 (the whole matrix is ~480 compiles, 15+ minutes on 2 cores from a cold
  Triton cache; `python scripts/compile_report.py` runs it too, with a table);
* the check's own logic (cuobjdump parsing, the limits, signature validation, a missing module
  reported rather than crashing) on small fabricated inputs.
"""

import os
import types

import pytest

from kernels.compile_check import (
    KERNEL_MODULES,
    TARGETS,
    _checked_signature,
    judge,
    parse_resource_usage,
    run_check,
)

FULL = os.environ.get("COMPILE_CHECK_FULL", "0") == "1"


@pytest.fixture(scope="module")
def report():
    # 2 workers: this project's CI machine has 2 cores. 120 s per compile: a healthy kernel takes
    # seconds; one that spills kilobytes of registers keeps ptxas busy for minutes, and fails anyway.
    return run_check(workers=2, first_config_only=not FULL, timeout=120)


def test_every_kernel_module_contributes_specs(report):
    problems = {m: n for m, n in report.modules.items() if not n}
    assert set(report.modules) == set(KERNEL_MODULES)
    assert not problems, "kernel modules without COMPILE_SPECS: " + "; ".join(
        f"{r.kernel}: {r.status} {r.error}" for r in report.results if r.kernel in problems
    )


@pytest.mark.parametrize("module", KERNEL_MODULES)
def test_compiles_within_limits(report, module):
    mine = [r for r in report.results if r.module == module]
    assert mine, f"no compile results for {module}"
    assert {r.target for r in mine if r.config} == set(TARGETS)
    failures = [r for r in mine if not r.ok]
    assert not failures, f"{len(failures)} of {len(mine)} failed:\n" + "\n".join(
        f"  {r.kernel} [{r.config}] {r.target}: {r.status} {r.error}" for r in failures
    )


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


def test_signature_validation():
    fn = types.SimpleNamespace(arg_names=["X", "stride", "N", "BLOCK"])
    sig = {"X": "*fp16", "stride": "i32:16", "N": "i32", "BLOCK": "constexpr"}
    types_, divisible = _checked_signature(fn, sig, {"BLOCK": 64})
    assert types_ == {"X": "*fp16", "stride": "i32", "N": "i32", "BLOCK": "constexpr"}
    assert divisible == [0, 1]  # the pointer (assumed aligned) and the int declared ":16"
    types_, divisible = _checked_signature(fn, sig, {"BLOCK": 64, "stride": 1})  # pinned to 1, as a launch does
    assert types_["stride"] == "constexpr" and divisible == [0]
    with pytest.raises(ValueError, match="missing"):
        _checked_signature(fn, {"X": "*fp16", "BLOCK": "constexpr"}, {"BLOCK": 64})
    with pytest.raises(ValueError, match="without a value"):
        _checked_signature(fn, sig, {})
    with pytest.raises(ValueError, match="pinned to 1"):
        _checked_signature(fn, sig, {"BLOCK": 64, "N": 7})
    with pytest.raises(ValueError, match="suffix"):
        _checked_signature(fn, {**sig, "N": "i32:8"}, {"BLOCK": 64})


def test_a_missing_module_is_reported_not_raised():
    rep = run_check(modules=("no_such_kernel",), workers=1)
    assert rep.modules == {"no_such_kernel": None}
    [row] = rep.failures
    assert row.status == "MISSING" and "no_such_kernel.py" in row.error
