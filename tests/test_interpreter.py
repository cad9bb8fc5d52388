"""What kernels/_common.py changes in Triton's interpreter to make it faster must change no result:
its NumPy loads and stores against the interpreter's own C++ loop, element for element, NumPy's
BLAS on one thread, the lighter tl.tensor / tl.block_type constructors against the originals, and
mask logic in one pass against the interpreter's int8 round trip.
(Every kernel test runs through them too.)"""

import numpy as np
import pytest

import kernels._common as common

pytestmark = pytest.mark.skipif(not common.INTERPRET, reason="only the interpreter is changed")


def _native():
    from triton._C.libtriton import interpreter as native  # the C++ loop

    return native


def _patched():
    from triton.runtime import interpreter

    return interpreter._interpreter  # what the interpreter calls now


# (dtype, shape, how the pointers walk the buffer): contiguous, strided, reversed, one scalar
CASES = [
    (np.float32, (7, 33), "contiguous"),
    (np.uint16, (5, 64), "strided"),  # bf16 travels as its 16-bit pattern
    (np.int64, (129,), "reversed"),
    (np.bool_, (3, 17), "contiguous"),
    (np.float32, (1,), "contiguous"),
]


def _pointers(buf, shape, walk, rng):
    n = int(np.prod(shape))
    idx = {"contiguous": np.arange(n), "strided": np.arange(n) * 3, "reversed": np.arange(n)[::-1] + 5}[walk]
    return (np.uint64(buf.ctypes.data) + idx.astype(np.uint64) * np.uint64(buf.itemsize)).reshape(shape)


@pytest.mark.parametrize("dtype,shape,walk", CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("mask_kind", ["all", "some", "none"])
def test_numpy_loads_and_stores_equal_the_interpreters_loop(dtype, shape, walk, mask_kind):
    rng = np.random.default_rng(0)
    buf = (rng.random(4 * int(np.prod(shape)) + 8) * 100).astype(dtype)
    ptrs = _pointers(buf, shape, walk, rng)
    mask = {"all": np.ones(shape, bool), "some": rng.random(shape) < 0.6, "none": np.zeros(shape, bool)}[mask_kind]
    other = (rng.random(shape) * 100).astype(dtype)
    native, patched = _native(), _patched()
    assert patched is not native  # the patch is in place

    want = native.load(ptrs, mask, other, np.dtype(dtype))
    got = patched.load(ptrs, mask, other, np.dtype(dtype))
    assert got.shape == want.shape and got.dtype == want.dtype and np.array_equal(got, want)

    value = (rng.random(shape) * 100).astype(dtype)
    buf_native = buf.copy()
    native.store(_pointers(buf_native, shape, walk, rng), value, mask)
    patched.store(ptrs, value, mask)
    assert np.array_equal(buf, buf_native)


def test_misaligned_pointers_fall_back_to_the_loop():
    buf = np.arange(16, dtype=np.float32)
    ptrs = np.uint64(buf.ctypes.data + 2) + np.arange(4, dtype=np.uint64) * np.uint64(4)  # 2 bytes off
    mask, other = np.ones(4, bool), np.zeros(4, np.float32)
    want = _native().load(ptrs, mask, other, np.dtype(np.float32))
    assert np.array_equal(_patched().load(ptrs, mask, other, np.dtype(np.float32)), want)


def test_numpy_blas_runs_on_one_thread():
    """The interpreter's tl.dot is np.matmul on small tiles: NumPy's OpenBLAS stays on one thread
    (its thread wake-ups cost milliseconds a dot on a busy CPU)."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    pools = [p for p in threadpoolctl.threadpool_info() if p["internal_api"] == "openblas"]
    if not pools:
        pytest.skip("this NumPy's BLAS is not OpenBLAS")
    assert all(p["num_threads"] == 1 for p in pools), pools


def test_a_store_to_repeated_addresses_ends_with_the_last_value():
    rng = np.random.default_rng(1)
    buf, buf_native = np.zeros(8, np.float32), np.zeros(8, np.float32)
    idx = rng.integers(0, 8, 200).astype(np.uint64)  # many lanes per address
    value, mask = rng.random(200).astype(np.float32), rng.random(200) < 0.7
    for b, mem in ((buf, _patched()), (buf_native, _native())):
        mem.store(np.uint64(b.ctypes.data) + idx * np.uint64(4), value, mask)
    assert np.array_equal(buf, buf_native)


def test_kernels_run_when_torch_imported_triton_first():
    """torch imports Triton itself (a fused AdamW, torch.compile) and may do so before kernels/ switches
    the interpreter on; the language's own jit functions (tl.sum, tl.max, tl.rand) must still work."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import os, sys, torch\n"
        "os.environ.pop('TRITON_INTERPRET', None)\n"
        "torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), fused=True)\n"
        "assert 'triton' in sys.modules\n"
        "from kernels.layer_norm import layer_norm\n"
        "from kernels.cross_entropy import cross_entropy\n"
        "from kernels.flash_attention import flash_attention\n"
        "x = torch.randn(5, 32)\n"
        "ref = torch.nn.functional.layer_norm(x, (32,))\n"
        "assert torch.allclose(layer_norm(x, torch.ones(32), torch.zeros(32)), ref, atol=1e-5)\n"
        "t = torch.randint(0, 32, (5,))\n"
        "assert torch.allclose(cross_entropy(x, t), torch.nn.functional.cross_entropy(x, t), atol=1e-5)\n"
        "q = torch.randn(1, 2, 16, 16)\n"
        "flash_attention(q, q, q, dropout_p=0.5)\n"  # tl.rand
        "print('ok')\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


def _fields(obj):
    """An object's attributes as (type, repr), less the cache the lighter constructors add."""
    return {k: (type(v), repr(v)) for k, v in vars(obj).items() if k != "_for_tensors"}


@pytest.mark.parametrize("shape", [[16], [2, 4], [1, 64], [4, 1, 8], "constexprs", "triton tuple"])
@pytest.mark.parametrize("dtype", ["float32", "int1", "pointer"])
def test_lighter_tensor_objects_equal_the_originals(shape, dtype):
    import triton.language.core as core

    patched_tensor, patched_block = core.tensor.__init__, core.block_type.__init__
    assert hasattr(patched_tensor, "_original") and hasattr(patched_block, "_original")  # the patch is in place
    if shape == "constexprs":
        shape = [core.constexpr(8), 4]
    elif shape == "triton tuple":
        shape = core.tuple([core.constexpr(2), core.constexpr(32)])
    elem = {"float32": core.float32, "int1": core.int1, "pointer": core.pointer_type(core.float16)}[dtype]
    for _ in range(2):  # the first call of a shape fills the table, the second reads it
        want_ty, got_ty = (core.block_type.__new__(core.block_type) for _ in range(2))
        patched_block._original(want_ty, elem, shape)
        patched_block(got_ty, elem, shape)
        assert _fields(got_ty) == _fields(want_ty) and got_ty == want_ty
        for ty in (want_ty, elem):  # a block and a scalar
            want, got = (core.tensor.__new__(core.tensor) for _ in range(2))
            patched_tensor._original(want, "handle", ty)
            patched_tensor(got, "handle", ty)
            assert _fields(got) == _fields(want)
    with pytest.raises(ValueError, match="power of 2"):  # still validated
        core.block_type(core.float32, [3, 4])
    with pytest.raises(AssertionError):  # a Python tuple is refused, as by the original
        core.block_type(core.float32, (2, 4))


@pytest.mark.parametrize("op", ["and", "or", "xor"])
def test_bool_logic_in_one_pass_equals_the_int8_round_trip(op):
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    create = getattr(InterpreterBuilder, f"create_{op}")
    assert getattr(create, "_one_pass", False)  # the patch is in place
    np_op = {"and": np.bitwise_and, "or": np.bitwise_or, "xor": np.bitwise_xor}[op]
    builder = InterpreterBuilder()
    rng = np.random.default_rng(0)
    rows, cols = rng.random((7, 1)) < 0.5, rng.random((1, 33)) < 0.5
    for lhs, rhs, dtype in [
        (np.broadcast_to(rows, (7, 33)), np.broadcast_to(cols, (7, 33)), tl.int1),  # a row mask & a column mask
        (rng.random(40) < 0.3, rng.random(40) < 0.7, tl.int1),
        (rng.integers(-9, 9, 40).astype(np.int32), rng.integers(-9, 9, 40).astype(np.int32), tl.int32),
    ]:
        a, b = TensorHandle(lhs, dtype), TensorHandle(rhs, dtype)
        got, want = create(builder, a, b), builder.binary_op(a, b, np_op)  # the original's path
        assert got.data.dtype == want.data.dtype and np.array_equal(got.data, want.data) and got.dtype == want.dtype
