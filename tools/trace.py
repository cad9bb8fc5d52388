"""Watch a Triton kernel run in the interpreter: every tile loaded and stored, every tl.dot, per program.

With TRITON_INTERPRET=1 Triton runs each program instance of a launch as Python over NumPy, and every
`tl.load`, `tl.store`, `tl.dot` and `tl.where` of the kernel ends in one method of a single object,
`triton.runtime.interpreter.interpreter_builder` (`create_masked_load`, `create_masked_store`,
`create_dot`, `create_select`; the unmasked `create_load`/`create_store` call the masked ones with an
all-true mask). `trace()` is a context manager that wraps those four methods, and the launch itself
(`GridExecutor.__call__`, which knows the kernel, its grid and its named arguments), for as long as it
is open; leaving it restores everything. The kernels do not change to be watched.

What is recorded, per launch (`Launch`):
  * the kernel's name, grid and arguments (so block sizes are read from the launch, never assumed);
  * per program (its `program_id` triple), in execution order, one `Event` per operation:
      - load / store: the kernel argument the pointers fall in (found by address: each tensor
        argument's storage range, element by element), the element size, how many lanes the tile has,
        how many the mask let through, and the *unmasked* elements' flat indices into that argument
        (its logical row-major index, whatever its strides). Bytes count the unmasked lanes only;
      - dot: the tile shapes (M, K) x (K, N). FLOPs = 2 * M * N * K of the tile product: what the
        hardware executes, padding rows and columns included (a GPU's tensor cores multiply whole
        tiles too; the lesson's formulas count the same way, from the block sizes, and "useful" FLOPs
        over real rows only appear separately as the physical minimum);
      - where: the condition's shape and how many of its lanes are false (a mask applied to values:
        this is how a causal mask on a score tile shows up).
    With `values=True` the dot results and the where conditions are kept as arrays too (for re-deriving
    an online softmax from the traced score tiles); otherwise only counts are kept.

Bytes are what the programs *request*: a tile of k that 8 query tiles read counts 8 times. On a GPU
re-reads of a small working set are often served by L2; `Launch.distinct_bytes` gives the bytes of
distinct elements touched, the traffic of a perfect cache.

Why our own tracer and not triton-viz (evaluated for this tool; version 3.0 is the one on PyPI):
  * it pulls in pyarrow, z3-solver, cairocffi, flask, flask_cloudflared and pre-commit as *runtime*
    dependencies, for a lesson that needs loads, stores and dots;
  * it replaces the interpreter's whole grid loop and AST transformer (for-loop patching, a thread
    pool), which ties it to one Triton's private internals far more than four wrapped builder methods;
    its 3.0 release does not support `tl.trans` (our backward kernels use it) and its profiler
    samples blocks by default, where we need every program to count bytes exactly.
  This module wraps four methods of one object and the launch call, in a few hundred lines, with no
  dependency beyond Triton and NumPy, and the interpreter still executes every operation itself.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Event:
    kind: str  # "load" | "store" | "dot" | "where"
    arg: str | None = None  # load/store: the kernel argument the pointers belong to
    elsize: int = 0  # load/store: bytes per element
    lanes: int = 0  # load/store: elements in the tile; where: lanes of the condition
    active: int = 0  # load/store: unmasked elements; where: lanes whose condition is false (masked out)
    index: np.ndarray | None = None  # load/store: flat logical indices of the unmasked elements
    shape: tuple = ()  # dot: (M, N, K); where: the condition's shape; load/store: the tile's shape
    value: np.ndarray | None = None  # dot: the result; where: the condition (only with values=True)

    @property
    def bytes(self) -> int:
        return self.active * self.elsize if self.kind in ("load", "store") else 0

    @property
    def flops(self) -> int:
        if self.kind != "dot":
            return 0
        m, n, k = self.shape
        return 2 * m * n * k


@dataclass
class Launch:
    kernel: str  # the Python function's name, e.g. "_flash_attention_fwd_kernel"
    grid: tuple  # (nx, ny, nz)
    args: dict  # argument name -> value (tensors as passed, ints, constexprs)
    programs: dict = field(default_factory=lambda: defaultdict(list))  # (x, y, z) -> [Event]

    def events(self, kind: str | None = None, arg: str | None = None):
        for pid, evs in self.programs.items():
            for e in evs:
                if (kind is None or e.kind == kind) and (arg is None or e.arg == arg):
                    yield pid, e

    def bytes(self, names=None) -> dict:
        """{argument: {"read": bytes, "written": bytes}} over every program. names: the arguments one
        expects (e.g. a formula's keys): a joint name "H|Y" becomes the one of them among names."""
        out: dict = {}
        for _, e in self.events():
            if e.kind in ("load", "store"):
                rw = out.setdefault(_resolve(e.arg, names), {"read": 0, "written": 0})
                rw["read" if e.kind == "load" else "written"] += e.bytes
        return out

    def distinct_bytes(self, names=None) -> dict:
        """{argument: {"read": bytes, "written": bytes}} counting each element once (a perfect cache)."""
        seen: dict = {}
        sizes: dict = {}
        for _, e in self.events():
            if e.kind in ("load", "store") and e.index is not None and e.index.size:
                seen.setdefault((e.arg, e.kind), []).append(e.index)
                sizes[e.arg] = e.elsize
        out: dict = {}
        for (arg, kind), idx in seen.items():
            rw = out.setdefault(_resolve(arg, names), {"read": 0, "written": 0})
            rw["read" if kind == "load" else "written"] = int(np.unique(np.concatenate(idx)).size) * sizes[arg]
        return out

    def flops(self) -> int:
        return sum(e.flops for _, e in self.events("dot"))

    def constexprs(self, *names) -> dict:
        return {n: self.args[n] for n in names if n in self.args}


def _resolve(arg: str, names) -> str:
    if names is None or arg is None or "|" not in arg:
        return arg
    hits = [n for n in arg.split("|") if n in names]
    return hits[0] if len(hits) == 1 else arg


class _ArgMap:
    """Which tensor argument a pointer tile falls in, and the logical indices of its elements."""

    def __init__(self, named: dict):
        self.tensors = []
        # Arguments that are one and the same tensor (a launcher's placeholder for an unused pointer,
        # e.g. layer_norm's H = Y without a residual) cannot be told apart by address: they get one
        # joint name, "H|Y", which `Launch.bytes(names=...)` resolves.
        same: dict = {}
        for name, t in named.items():
            if isinstance(t, torch.Tensor) and t.numel() > 0:
                same.setdefault((t.data_ptr(), t.dtype, tuple(t.shape), t.stride()), []).append(name)
        for names in same.values():
            name, t = "|".join(names), named[names[0]]
            es = t.element_size()
            lo = t.data_ptr() + es * sum(min(0, (n - 1) * s) for n, s in zip(t.shape, t.stride()))
            hi = t.data_ptr() + es * (1 + sum(max(0, (n - 1) * s) for n, s in zip(t.shape, t.stride())))
            self.tensors.append((name, t, lo, hi, es))
        self._lookup: dict = {}

    def _table(self, name, t, lo, es):
        """A map from element offset (from lo) to the logical flat index, -1 where no element lives."""
        if name not in self._lookup:
            off = np.zeros(tuple(t.shape), dtype=np.int64)
            for k, (n, s) in enumerate(zip(t.shape, t.stride())):
                off = off + (np.arange(n, dtype=np.int64) * s).reshape([n if j == k else 1 for j in range(t.dim())])
            off = off.reshape(-1) + (t.data_ptr() - lo) // es  # element offsets from lo, row-major order
            table = np.full(int(off.max()) + 1, -1, dtype=np.int64)
            table[off] = np.arange(off.size)  # a broadcast (stride 0) tensor: the last index wins
            self._lookup[name] = table
        return self._lookup[name]

    def resolve(self, addrs: np.ndarray):
        """(argument name, element size, logical indices) of these byte addresses."""
        if addrs.size == 0:
            return None, 0, np.empty(0, np.int64)
        amin, amax = int(addrs.min()), int(addrs.max())
        for name, t, lo, hi, es in self.tensors:
            if lo <= amin and amax < hi and ((addrs - lo) % es == 0).all():
                table = self._table(name, t, lo, es)
                idx = table[(addrs - lo) // es]
                if (idx >= 0).all():
                    return name, es, idx
        return "?", 0, np.empty(0, np.int64)


@contextlib.contextmanager
def trace(values: bool = False, keep=None):
    """Record every launch run by Triton's interpreter while open; yields the list of `Launch`es.

    values: keep dot results and where conditions (see the module docstring).
    keep: optional predicate (kernel_name, program_id) -> bool; programs it rejects still run, but
    their events are not stored (to trace one program of a big launch cheaply)."""
    import triton.runtime.interpreter as interp

    if not isinstance(getattr(interp, "interpreter_builder", None), interp.InterpreterBuilder):
        raise RuntimeError("tools.trace needs Triton's interpreter (TRITON_INTERPRET=1 before importing triton)")
    builder = interp.interpreter_builder
    launches: list[Launch] = []
    state = {"launch": None, "map": None}
    orig_call = interp.GridExecutor.__call__
    orig = {n: getattr(builder, n) for n in ("create_masked_load", "create_masked_store", "create_dot", "create_select")}

    def current():
        launch = state["launch"]
        if launch is None:
            return None
        pid = tuple(builder.grid_idx)
        if keep is not None and not keep(launch.kernel, pid):
            return None
        return launch.programs[pid]

    def memory(kind, ptrs, mask):
        evs = current()
        if evs is None:
            return
        addrs = np.asarray(ptrs.data, dtype=np.int64)
        m = np.broadcast_to(np.asarray(mask.data, dtype=bool), addrs.shape)
        live = addrs[m]
        arg, es, idx = state["map"].resolve(live)
        if arg is None:  # fully masked: nothing moves; still name the tensor for the record
            arg, es, _ = state["map"].resolve(addrs.reshape(-1)[:1])
        evs.append(Event(kind, arg, es, int(addrs.size), int(live.size), idx, tuple(addrs.shape)))

    def masked_load(ptrs, mask, other, cache_policy, is_volatile):
        memory("load", ptrs, mask)
        return orig["create_masked_load"](ptrs, mask, other, cache_policy, is_volatile)

    def masked_store(ptrs, value, mask, cache_policy):
        memory("store", ptrs, mask)
        return orig["create_masked_store"](ptrs, value, mask, cache_policy)

    def dot(a, b, d, input_precision, max_num_imprecise_acc):
        out = orig["create_dot"](a, b, d, input_precision, max_num_imprecise_acc)
        evs = current()
        if evs is not None:
            (m, k), n = a.data.shape[-2:], b.data.shape[-1]
            evs.append(Event("dot", shape=(m, n, k), value=out.data.copy() if values else None))
        return out

    def select(cond, lhs, rhs):
        evs = current()
        if evs is not None:
            c = np.asarray(cond.data, dtype=bool)
            evs.append(Event("where", lanes=int(c.size), active=int(c.size - c.sum()), shape=tuple(c.shape),
                             value=c.copy() if values else None))
        return orig["create_select"](cond, lhs, rhs)

    def call(self, *args, **kwargs):
        fn = self.fn
        while hasattr(fn, "__wrapped__"):
            fn = fn.__wrapped__
        argspec = inspect.getfullargspec(self.fn)
        kw = {k: v for k, v in kwargs.items() if k in argspec.args or k in argspec.kwonlyargs}
        named = inspect.getcallargs(self.fn, *args, **kw)
        grid = self.grid(named) if callable(self.grid) else self.grid
        grid = tuple(grid) + (1,) * (3 - len(grid))
        launch = Launch(self.fn.__name__, grid, named)
        launches.append(launch)
        state["launch"], state["map"] = launch, _ArgMap(named)
        try:
            return orig_call(self, *args, **kwargs)
        finally:
            state["launch"] = state["map"] = None

    # Trace the launches a GPU runs: the launchers' interpreter configurations (few, huge programs,
    # kernels._common.INTERPRETER_CONFIGS) only make the interpreter fast; the lessons count the GPU's.
    import kernels._common as common

    interpreter_configs = common.INTERPRETER_CONFIGS
    common.INTERPRETER_CONFIGS = False
    interp.GridExecutor.__call__ = call
    builder.create_masked_load = masked_load
    builder.create_masked_store = masked_store
    builder.create_dot = dot
    builder.create_select = select
    try:
        yield launches
    finally:
        common.INTERPRETER_CONFIGS = interpreter_configs
        interp.GridExecutor.__call__ = orig_call
        for n in orig:
            delattr(builder, n)  # the instance attributes go; the class's methods show again


# ----------------------------------------------------------------------------------------------
# Counting torch ops (the unfused PyTorch sequences, and the matmuls of linear_cross_entropy)
# ----------------------------------------------------------------------------------------------
class TorchOpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Each ATen op that runs while active, with the bytes of its tensor inputs (read) and outputs
    (written), and 2 * M * N * K FLOPs for matmuls: the traffic of eager PyTorch, one kernel per op,
    each reading its operands from memory and writing its result. Views move nothing and are skipped.

    Our own custom ops (namespace gpt_triton) are opened up: their Python bodies run under the counter,
    so the torch ops inside (linear_cross_entropy's matmuls) are counted too. The interpreter's own
    bookkeeping while it runs a Triton launch (copying arguments to and from the host) is not counted:
    a `trace()` records the launch itself."""

    MATMULS = ("mm", "addmm", "bmm", "matmul")
    ALLOCATIONS = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided")  # move no bytes

    def __init__(self):
        super().__init__()
        self.ops: list[dict] = []
        self._paused = 0

    def __enter__(self):
        import triton.runtime.interpreter as interp

        self._orig_call = orig = interp.GridExecutor.__call__
        counter = self

        def call(executor, *args, **kwargs):
            counter._paused += 1
            try:
                return orig(executor, *args, **kwargs)
            finally:
                counter._paused -= 1

        interp.GridExecutor.__call__ = call
        return super().__enter__()

    def __exit__(self, *exc):
        import triton.runtime.interpreter as interp

        interp.GridExecutor.__call__ = self._orig_call
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._paused:
            return func(*args, **kwargs)
        if func.namespace == "gpt_triton":
            from torch._library.custom_ops import OPDEFS

            with self:  # the mode is popped while it handles an op: push it again for the op's body
                return OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        ins = _tensors(args) + _tensors(kwargs)
        outs = _tensors(out)
        if not _is_view(name, kwargs, ins, outs) and name not in self.ALLOCATIONS:
            if name.endswith("_") or "out" in kwargs:  # in place: the first operand is read and written
                outs = outs[:1]
                if name == "copy_":  # ... except by a copy, which only writes it
                    ins = ins[1:]
            read = sum(_nbytes(t) for t in ins)
            if name in _GATHERS:  # reads one element per index of its big input, not all of it
                big, index = ins[0], ins[_GATHERS[name]]
                read = read - _nbytes(big) + index.numel() * big.element_size()
            elif name == "nll_loss_backward":  # uses its input (the log-probabilities) for its shape only
                read -= _nbytes(ins[1])
            flops = 0
            if name in self.MATMULS:
                a, b = ins[-2], ins[-1]
                flops = 2 * a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if a.dim() == 3 else 1)
            self.ops.append({"op": name, "read": read,
                             "written": sum(_nbytes(t) for t in outs), "flops": flops})
        return out

    @contextlib.contextmanager
    def paused(self):
        """Run torch ops uncounted (a driver's own inputs, say)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def totals(self, ops=None) -> dict:
        """{"read", "written", "flops"} summed over the ops (all, or those named in `ops`)."""
        sel = [o for o in self.ops if ops is None or o["op"] in ops]
        return {k: sum(o[k] for o in sel) for k in ("read", "written", "flops")}


# ops that read their first input at the positions of an index argument (its position among the tensors)
_GATHERS = {"nll_loss_forward": 1, "gather": 1, "index_select": 1, "embedding": 1}


def _is_view(name: str, kwargs: dict, ins: list, outs: list) -> bool:
    """An op that returned a view of an input (a slice, a transpose, `to` a dtype it already has):
    its outputs live in an input's storage and it is not an in-place or out= op."""
    if name.endswith("_") or "out" in kwargs or not outs:
        return False
    storages = {t.untyped_storage().data_ptr() for t in ins if t.numel()}
    return all(t.untyped_storage().data_ptr() in storages for t in outs if t.numel())


def _tensors(x) -> list:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for y in x for t in _tensors(y)]
    if isinstance(x, dict):
        return [t for y in x.values() for t in _tensors(y)]
    return []


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
