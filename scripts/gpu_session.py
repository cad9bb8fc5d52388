"""One command on a machine with a GPU: the machine's ceilings, the kernel tests, the benches that
decide the targets and one report, written to one folder, within a time budget.

    python scripts/gpu_session.py                      # budget mode: 8 minutes -> bench/results/<device>-<date>/
    python scripts/gpu_session.py /some/dir --budget 300   # any output root, any budget in seconds
    python scripts/gpu_session.py --full               # no budget: every test, every bench, every config
    python scripts/gpu_session.py --estimate           # only print the compile-cost estimate and the pruning
    ALLOW_CPU=1 python scripts/gpu_session.py          # try it without a GPU (GPU-only parts are skipped)

Needs torch and triton only (no network, no data beside the checkout). The folder
`<root>/<device>-<date>/` gets at most 7 files:

  env.txt       date, commit, device, versions, nvidia-smi, and the compile-cost estimate
  ceilings.json device-to-device copy bandwidth (GB/s, read + write) and a bf16 8192^3 matmul (TFLOP/s)
  tests.log     the kernel, fused-model and generation tests, run natively on the GPU
  bench.json    pytest-benchmark's JSON of every bench that ran (its extra_info holds the figures)
  bench.log     the benches' output
  report.md     each figure as a ratio to its baselines and as a fraction of the measured ceiling,
                judged against the targets (issue 9)
  summary.txt   each step's exit status and time

Budget mode. The budget (default 480 s) covers everything, compilation and autotuning included:
each step runs with a time limit taken from what is left (a step that ends early leaves its time
to the next), in the order that matters: ceilings, tests (a correctness failure stops the session
with a summary of what failed: no bench of a wrong kernel is worth reading), attention, the
row-wise kernels, the training step, decoding, then torch.compile's baselines; the report is
always written. Each autotuned
kernel keeps only its first few configs (GPT_TRITON_MAX_CONFIGS, read by kernels/_common.py's
autotune), as many as the compile-cost estimate allows: the estimate sums the cold compile times
per variant that `scripts/compile_report.py --json` measured for sm_90 (bench/results/
compile-report.json), over the variants the GPT-2-shaped calls compile with that many configs.
`--full` keeps every config and has no time limit.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from model.cli import UsageError, run  # noqa: E402

COMPILE_REPORT = ROOT / "bench" / "results" / "compile-report.json"
DEFAULT_BUDGET_S = 480
# Of the budget, at most, for compiling the benches' Triton kernels (the estimate must fit it): the
# benches have ~60% of the budget and must time as well; the tests compile their own variants too.
COMPILE_SHARE = 0.2
REPORT_RESERVE_S = 15  # always left for writing the report

# The benches that decide the targets, in priority order: (name, share of the budget, pytest args).
# torch.compile's baselines come last, in parts of their own: Inductor's compiles are the slowest
# thing here, and a part cut short by its time limit loses its JSON (pytest-benchmark writes it at
# the end), so they must not take the kernels' figures down with them.
_ROWWISE = ["bench/test_bench_layer_norm.py", "bench/test_bench_bias_gelu.py", "bench/test_bench_cross_entropy.py"]
BENCH_PARTS = [
    ("attention", 0.18, ["bench/test_bench_attention.py", "-k", "(triton or sdpa) and not T512"]),
    ("rowwise", 0.10, [*_ROWWISE, "-k", "(C768 or N8192) and not add_layer_norm and not compile"]),
    ("train", 0.08, ["bench/test_bench_train.py", "-k", "not compile"]),
    ("decode", 0.07, ["bench/test_bench_generate.py", "-k", "B1 and not no_cache"]),
    ("rowwise-compiled", 0.08, [*_ROWWISE, "-k", "(C768 or N8192) and not add_layer_norm and compile"]),
    ("train-compiled", 0.08, ["bench/test_bench_train.py", "-k", "compile"]),
]
TESTS_SHARE = 0.35

# Targets (H100/H200, bf16; issue 9).
ATTN_FWD_VS_SDPA, ATTN_FWD_TFLOPS, ATTN_FWD_TFLOPS_FROM_T, ATTN_BWD_TFLOPS = 1.0, 300.0, 4096, 250.0
ROWWISE_COPY_FRACTION = 0.8
CE_VS_EAGER = 2.0
DECODE_TOKENS_PER_S = 3000.0


# ----------------------------------------------------------------------------------------------
# The compile-cost estimate (runs anywhere: it reads the committed compile report)
# ----------------------------------------------------------------------------------------------
def _group_key(r: dict) -> tuple:
    """Variants that differ only in the autotuner's config: same kernel, dtype, target, calls and
    specialisation. Within a group the report keeps the autotuner's (preference) order."""
    consts = " ".join(c for c in r["config"].split() if not re.match(r"(BLOCK_[A-Z]+=|w\d|s\d)", c))
    return r["kernel"], r["dtype"], r["target"], tuple(r["specs"]), json.dumps(r["specialisation"], sort_keys=True), consts


def benched(spec: str) -> bool:
    """Whether the budget run's benches launch what this COMPILE_SPECS call stands for: bf16 at
    gpt2-124M's shapes (attention at head dim 64, the row-wise kernels and the loss of a training
    step, decoding at batch 1 and the prompt before it)."""
    if ".bf16" not in spec:
        return False
    if spec.startswith("decode_attention."):
        return spec.endswith(".gpt2-124M.b1.tq1")
    return spec.endswith(".gpt2-124M") or spec.startswith(("flash_attention.prefill.", "cross_entropy."))


def compile_estimate(report: dict, max_configs: int | None, target: str = "sm_90", select=benched) -> tuple[int, float]:
    """(variants, seconds) to compile for `target` when each autotuned launch keeps its first
    `max_configs` configs (None: all), at the cold compile times the report measured, over the
    variants launched by a COMPILE_SPECS call that `select` keeps (None: all)."""
    seen: dict = {}
    n, secs = 0, 0.0
    for r in report["results"]:
        if r.get("target") != target or r.get("compile_s") is None:
            continue
        if select is not None and not any(select(spec) for spec in r["specs"]):
            continue
        k = _group_key(r)
        seen[k] = seen.get(k, 0) + 1
        if max_configs is None or seen[k] <= max_configs:
            n += 1
            secs += r["compile_s"]
    return n, secs


def choose_max_configs(budget_s: float, report: dict | None) -> tuple[int | None, list[str]]:
    """The most configs per autotuned kernel whose estimated compile cost fits COMPILE_SHARE of the
    budget, and the lines that explain it."""
    if report is None:
        return 1, [f"no {COMPILE_REPORT.relative_to(ROOT)}: no estimate; keeping 1 config per autotuned kernel"]
    allowed = COMPILE_SHARE * budget_s
    lines = [f"compile-cost estimate: the benches' variants (bf16, gpt2-124M's shapes) at the sm_90 cold compile "
             f"times compile_report.py measured ({report.get('cpu', '?')}, {report.get('workers', '?')} worker(s) on a "
             f"shared CPU: an upper bound; commit {str(report.get('commit', '?'))[:12]}). The tests' own variants (odd "
             f"shapes, every dtype) are not in it: their step has its own time limit."]
    choice = None
    n_all, secs_all = compile_estimate(report, None, select=None)
    lines.append(f"  (every GPT-2-shaped variant of every dtype and head dim, for reference: {n_all} variants, {secs_all:.0f} s)")
    for m in (None, 3, 2, 1):
        n, secs = compile_estimate(report, m)
        label = "all configs" if m is None else f"{m} config(s) per autotuned kernel"
        fits = secs <= allowed
        lines.append(f"  {label}: {n} variants, {secs:.0f} s {'<=' if fits else '>'} {allowed:.0f} s allowed")
        if fits and choice is None:
            choice = m if m is not None else 0
    if choice is None:
        lines.append("  even 1 config does not fit: keeping 1 (the tests' and benches' time limits still hold)")
        choice = 1
    lines.append(f"  -> GPT_TRITON_MAX_CONFIGS={choice or 'unset (all)'}")
    return (choice or None), lines


def load_compile_report() -> dict | None:
    try:
        return json.loads(COMPILE_REPORT.read_text())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------
class Session:
    def __init__(self, out: Path, budget_s: float | None, env: dict, py: str):
        self.out, self.budget_s, self.env, self.py = out, budget_s, env, py
        self.t0 = time.monotonic()
        self.carry = 0.0  # seconds earlier steps left unused
        self.summary: list[str] = []

    def left(self) -> float:
        return float("inf") if self.budget_s is None else self.budget_s - (time.monotonic() - self.t0)

    def limit(self, share: float) -> float | None:
        """This step's time limit: its share plus what earlier steps left, within what remains."""
        if self.budget_s is None:
            return None
        return max(0.0, min(share * self.budget_s + self.carry, self.left() - REPORT_RESERVE_S))

    def record(self, name: str, rc, secs: float, note: str = "") -> None:
        line = f"{name}: {'exit ' + str(rc) if isinstance(rc, int) else rc} ({secs:.0f} s){' ' + note if note else ''}"
        self.summary.append(line)
        print("gpu_session: " + line, flush=True)

    def run(self, name: str, cmd: list[str], log: Path, share: float, append: bool = False):
        """Run cmd with this step's time limit; returns (rc or "timed out"/"skipped", seconds)."""
        limit = self.limit(share)
        if limit is not None and limit < 5:
            return "skipped (no time left in the budget)", 0.0
        t = time.monotonic()
        with open(log, "a" if append else "w") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            try:
                rc = subprocess.run(cmd, cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                    timeout=limit).returncode
            except subprocess.TimeoutExpired:
                rc = "timed out"
                f.write(f"\n[gpu_session: killed after its {limit:.0f} s limit]\n")
        secs = time.monotonic() - t
        if limit is not None:
            self.carry = max(0.0, share * self.budget_s + self.carry - secs)
        return rc, secs


def write_env(path: Path, device: str, estimate_lines: list[str], mode: str) -> None:
    import torch

    lines = [f"date: {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}", f"mode: {mode}",
             f"device: {device}"]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT).returncode != 0
        lines.append(f"commit: {commit or 'unknown'}{' (plus uncommitted changes)' if dirty else ''}")
    except OSError:
        lines.append("commit: unknown (no git)")
    lines += [f"python: {platform.python_version()}", f"torch: {torch.__version__}", f"cuda (torch built with): {torch.version.cuda}"]
    try:
        import triton

        lines.append(f"triton: {triton.__version__}")
    except ImportError:
        lines.append("triton: not installed")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        lines.append(f"compute capability: {p.major}.{p.minor}, SMs: {p.multi_processor_count}, "
                     f"memory: {p.total_memory / 2**30:.1f} GiB")
    lines += ["", *estimate_lines, ""]
    try:
        lines.append(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout)
    except (OSError, subprocess.TimeoutExpired):
        lines.append("nvidia-smi: not found")
    path.write_text("\n".join(lines) + "\n")


def measure_ceilings(cuda: bool) -> dict:
    import torch
    from bench_util import copy_bandwidth_gbs, matmul_tflops

    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        return {"copy_gbs": copy_bandwidth_gbs(device), "matmul_bf16_tflops": matmul_tflops(device, 8192),
                "matmul_n": 8192, "device": torch.cuda.get_device_name(0)}
    # A CPU try of the script: small sizes, fp32 (a CPU's bf16 matmul can be 100x slower than its fp32).
    return {"copy_gbs": copy_bandwidth_gbs(device, mib=256),
            "matmul_bf16_tflops": matmul_tflops(device, 512, dtype=torch.float32),
            "matmul_n": 512, "matmul_dtype": "fp32 (a CPU try: not a GPU ceiling)", "device": "cpu"}


def kernel_test_files() -> list[str]:
    """The kernel tests (tests/test_<lesson>.py for every lesson), the fused model and generation."""
    from tools.compile_check import kernel_modules

    names = [f"tests/test_{m}.py" for m in kernel_modules()] + ["tests/test_fused_model.py", "tests/test_generate.py"]
    return [n for n in names if (ROOT / n).exists()]


def failed_tests(log: Path) -> list[str]:
    text = log.read_text(errors="replace") if log.exists() else ""
    return [ln for ln in text.splitlines() if ln.startswith(("FAILED", "ERROR"))][:20]


def merge_bench_json(parts: list[Path], out: Path) -> list[dict]:
    merged, benches = None, []
    for p in parts:
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        merged = merged or data
        benches += data.get("benchmarks", [])
    if merged is not None:
        merged["benchmarks"] = benches
        out.write_text(json.dumps(merged, indent=1) + "\n")
    return benches


# ----------------------------------------------------------------------------------------------
# The report: every figure against its baselines and the measured ceilings, judged on the targets
# ----------------------------------------------------------------------------------------------
def _fmt(x, digits=3) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def judge(benches: list[dict], ceilings: dict) -> list[tuple]:
    """(target, figure, measured, of ceiling, verdict) rows."""
    copy_gbs, mm_tflops = ceilings.get("copy_gbs"), ceilings.get("matmul_bf16_tflops")
    info = [b.get("extra_info", {}) for b in benches]
    kern = {(e.get("kernel"), e.get("pass"), e.get("size"), e.get("impl")): e for e in info if "kernel" in e}
    rows = []

    def verdict(ok):
        return "not measured" if ok is None else ("PASS" if ok else "MISS")

    for T in (1024, 2048, 4096, 8192):
        f = kern.get(("attention", "fwd", T, "triton"))
        fb = kern.get(("attention", "fwd+bwd", T, "triton"))
        if f:
            ok = f.get("vs_sdpa", 0) >= ATTN_FWD_VS_SDPA and (T < ATTN_FWD_TFLOPS_FROM_T or f["value"] >= ATTN_FWD_TFLOPS)
            rows.append((f"attention fwd T={T}: >= {ATTN_FWD_VS_SDPA}x SDPA" +
                         (f", >= {ATTN_FWD_TFLOPS:g} TFLOP/s" if T >= ATTN_FWD_TFLOPS_FROM_T else ""),
                         f"{_fmt(f['value'])} TFLOP/s, {_fmt(f.get('vs_sdpa'))}x SDPA, {_fmt(f.get('vs_eager'))}x eager",
                         _frac(f["value"], mm_tflops), verdict(ok)))
        else:
            rows.append((f"attention fwd T={T}", "-", "-", verdict(None)))
        if f and fb and fb["median_ms"] > f["median_ms"]:
            fwd_flops = f["value"] * 1e12 * f["median_ms"] * 1e-3
            bwd = 2.5 * fwd_flops / ((fb["median_ms"] - f["median_ms"]) * 1e-3) / 1e12
            rows.append((f"attention bwd T={T}: >= {ATTN_BWD_TFLOPS:g} TFLOP/s",
                         f"{_fmt(bwd)} TFLOP/s (fwd+bwd minus fwd), fwd+bwd {_fmt(fb.get('vs_sdpa'))}x SDPA",
                         _frac(bwd, mm_tflops), verdict(bwd >= ATTN_BWD_TFLOPS)))
    for op, base in (("layer_norm", "F.layer_norm"), ("bias_gelu", "eager")):
        for (k, p, size, impl), e in sorted(kern.items(), key=lambda kv: str(kv[0])):
            if k != op or impl != "triton":
                continue
            comp = kern.get((k, p, size, "compile"))
            vs_compile = comp["median_ms"] / e["median_ms"] if comp else None
            ok = None if not copy_gbs else e["value"] >= ROWWISE_COPY_FRACTION * copy_gbs
            rows.append((f"{op} {p} {e.get('x_label')}={size}: >= {ROWWISE_COPY_FRACTION:.0%} of copy bandwidth",
                         f"{_fmt(e['value'])} GB/s, {_fmt(e.get('vs_' + base))}x {base}, {_fmt(e.get('vs_eager'))}x eager, "
                         f"{_fmt(vs_compile)}x torch.compile", _frac(e["value"], copy_gbs), verdict(ok)))
    for (k, p, size, impl), e in sorted(kern.items(), key=lambda kv: str(kv[0])):
        if k != "cross_entropy" or impl != "triton":
            continue
        comp = kern.get((k, p, size, "compile"))
        vs_compile = comp["median_ms"] / e["median_ms"] if comp else None
        grad_mb = size * 50257 * 2 / 2**20 if p == "fwd+bwd" else 0.0
        extra = e.get("peak_extra_mb")
        no_extra = None if extra is None else extra <= 1.1 * grad_mb + 64
        ok = None if p != "fwd+bwd" else (e.get("vs_eager", 0) >= CE_VS_EAGER and bool(no_extra))
        rows.append((f"cross_entropy {p} N={size}" + (f": >= {CE_VS_EAGER:g}x eager, no extra (N, V) buffer" if p == "fwd+bwd" else ""),
                     f"{_fmt(e['value'])} GB/s, {_fmt(e.get('vs_eager'))}x eager, {_fmt(e.get('vs_F.cross_entropy'))}x "
                     f"F.cross_entropy, {_fmt(vs_compile)}x torch.compile; peak extra {_fmt(extra)} MiB "
                     f"(the gradient itself: {grad_mb:.0f} MiB)", _frac(e["value"], copy_gbs),
                     verdict(ok) if p == "fwd+bwd" else "(figure)"))
    train = {e.get("impl"): e for e in info if e.get("bench") == "train"}
    if "fused" in train:
        e = train["fused"]
        rows.append(("training step gpt2-124M bf16: fused faster than PyTorch",
                     f"{_fmt(e.get('tokens_per_s'))} tokens/s, {_fmt(e.get('vs_torch'))}x PyTorch"
                     + (f", compiled {_fmt(train['compile'].get('vs_torch'))}x PyTorch" if "compile" in train else ""),
                     _frac(e.get("model_tflops"), mm_tflops), verdict(e.get("vs_torch", 0) > 1.0)))
    else:
        rows.append(("training step gpt2-124M bf16: fused faster than PyTorch", "-", "-", verdict(None)))
    for impl, e in sorted(train.items()):
        if impl != "fused":
            rows.append((f"training step gpt2-124M, {impl} ({e.get('dtype')})",
                         f"{_fmt(e.get('tokens_per_s'))} tokens/s, step {_fmt(e.get('step_ms'))} ms"
                         + (f", {_fmt(e.get('vs_torch'))}x PyTorch" if "vs_torch" in e else ""),
                         _frac(e.get("model_tflops"), mm_tflops), "(figure)"))
    gen = [e for e in info if "decode" in e and e.get("batch") == 1]
    graph = next((e for e in gen if e.get("impl") == "fused" and e.get("decode") == "cuda_graph"), None)
    for e in sorted(gen, key=lambda e: (e.get("impl", ""), e.get("decode", ""))):
        is_target = e is graph
        rows.append((f"decode batch 1, {e.get('impl')}, {e.get('decode')}" +
                     (f": >= {DECODE_TOKENS_PER_S:g} tokens/s" if is_target else ""),
                     f"{_fmt(e.get('tokens_per_s'))} tokens/s" +
                     "".join(f", {_fmt(v)}x {k[3:]}" for k, v in e.items() if k.startswith("vs_")), "-",
                     verdict(e.get("tokens_per_s", 0) >= DECODE_TOKENS_PER_S) if is_target else "(figure)"))
    if graph is None:
        rows.append((f"decode batch 1, fused, cuda_graph: >= {DECODE_TOKENS_PER_S:g} tokens/s", "-", "-", verdict(None)))
    return rows


def _frac(value, ceiling) -> str:
    if value is None or not ceiling:
        return "-"
    return f"{value / ceiling:.0%}"


def write_report(path: Path, benches: list[dict], ceilings: dict, session: Session, mode: str, estimate: list[str]) -> None:
    rows = judge(benches, ceilings)
    lines = [f"# GPU session report ({mode})", "",
             f"Ceilings measured in this run: device-to-device copy {_fmt(ceilings.get('copy_gbs'), 4)} GB/s "
             f"(bytes read + written), {ceilings.get('matmul_dtype', 'bf16')} {ceilings.get('matmul_n', 8192)}^3 matmul "
             f"{_fmt(ceilings.get('matmul_bf16_tflops'), 4)} TFLOP/s. \"of ceiling\": a TFLOP/s figure over the matmul's, "
             "a GB/s figure over the copy's. Ratios are against baselines timed in the same run (> 1: ours is faster).", "",
             "| target | measured | of ceiling | verdict |", "| --- | --- | --- | --- |"]
    lines += [f"| {t} | {m} | {c} | {v} |" for t, m, c, v in rows]
    verdicts = [r[3] for r in rows]
    lines += ["", f"{verdicts.count('PASS')} PASS, {verdicts.count('MISS')} MISS, "
              f"{verdicts.count('not measured')} not measured.", "", "## Steps", "", *[f"- {s}" for s in session.summary],
              "", "## Compile budget", "", *[f"    {s}" for s in estimate], ""]
    if not any(b.get("extra_info", {}).get("device", "cpu") != "cpu" for b in benches):
        lines.insert(2, "**No GPU in this run: the figures (if any) are CPU numbers of the PyTorch paths; the "
                        "kernel benches were skipped.**\n")
    path.write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", nargs="?", default=str(ROOT / "bench" / "results"),
                    help="where the <device>-<date>/ folder goes (default bench/results)")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                    help=f"seconds for the whole session (default {DEFAULT_BUDGET_S})")
    ap.add_argument("--full", action="store_true", help="no budget: every test, every bench, every autotune config")
    ap.add_argument("--estimate", action="store_true", help="print the compile-cost estimate and exit")
    ap.add_argument("--keep-going", action="store_true", help="run the benches even if a test fails")
    args = ap.parse_args(argv)
    if not args.full and args.budget < 60:
        raise UsageError("--budget must be at least 60 seconds")

    budget = None if args.full else args.budget
    max_configs, estimate = (None, ["--full: every autotune config, no compile budget"]) if args.full else \
        choose_max_configs(args.budget, load_compile_report())
    if args.estimate:
        print("\n".join(estimate))
        return 0

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("ALLOW_CPU", "0") != "1":
        raise UsageError("torch sees no CUDA device; this records GPU results (set ALLOW_CPU=1 to try the script on a CPU)")
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    base = Path(args.root) / f"{_slug(device)}-{dt.datetime.now(dt.timezone.utc):%Y-%m-%d}"
    out, n = base, 2
    while out.exists():  # a second session the same day gets its own folder, never overwrites
        out, n = Path(f"{base}-{n}"), n + 1
    out.mkdir(parents=True)
    mode = "full sweep" if args.full else f"budget {args.budget:.0f} s"
    print(f"gpu_session: {mode}, writing to {out}", flush=True)
    print("\n".join(estimate), flush=True)

    env = dict(os.environ, TRITON_DEFAULT_FP_FUSION=os.environ.get("TRITON_DEFAULT_FP_FUSION", "1"))
    if max_configs:
        env["GPT_TRITON_MAX_CONFIGS"] = str(max_configs)
    py = sys.executable
    session = Session(out, budget, env, py)
    write_env(out / "env.txt", device, estimate, mode)

    t = time.monotonic()
    ceilings = measure_ceilings(cuda)
    (out / "ceilings.json").write_text(json.dumps(ceilings, indent=1) + "\n")
    session.record("ceilings", 0, time.monotonic() - t, f"copy {ceilings['copy_gbs']} GB/s, "
                   f"matmul {ceilings['matmul_bf16_tflops']} TFLOP/s")

    # -- tests: natively on the GPU; on a CPU only collected (the interpreter would take an hour) --
    tests = ["tests/"] if args.full else kernel_test_files()
    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    if cuda:
        rc, secs = session.run("tests", pytest + ["--maxfail=5", *tests], out / "tests.log", TESTS_SHARE)
    else:
        rc, secs = session.run("tests", pytest + ["--collect-only", *tests], out / "tests.log", TESTS_SHARE)
        rc = f"collected only, no GPU (exit {rc})"
    failures = failed_tests(out / "tests.log")
    session.record("tests", rc, secs, f"{len(failures)} failed" if failures else "")
    stop = cuda and rc not in (0, "timed out") and not args.keep_going

    # -- benches, in priority order --
    parts = []
    if stop:
        session.summary.append("CORRECTNESS FAILED: benches skipped (--keep-going runs them anyway). Failures:")
        session.summary += [f"    {f}" for f in failures] or ["    (see tests.log)"]
    else:
        bench_parts = [("all", 1.0, ["bench/"])] if args.full else BENCH_PARTS
        for name, share, sel in bench_parts:
            part_json = out / f".bench-{name}.json"
            rc, secs = session.run(f"bench {name}", pytest + [*sel, "--benchmark-only", "--benchmark-json",
                                                             str(part_json)], out / "bench.log", share, append=True)
            session.record(f"bench {name}", rc, secs)
            parts.append(part_json)
    benches = merge_bench_json(parts, out / "bench.json")
    for p in parts:
        p.unlink(missing_ok=True)

    if args.full:
        rc, secs = session.run("compile report", [py, "scripts/compile_report.py", "--json", str(out / "compile-report.json"),
                                                  "--workers", str(os.cpu_count() or 2), "-q"], out / "compile_report.txt", 1.0)
        session.record("compile report", rc, secs)

    elapsed = time.monotonic() - session.t0
    session.summary.append(f"total: {elapsed:.0f} s" + (f" of a {budget:.0f} s budget" if budget else ""))
    write_report(out / "report.md", benches, ceilings, session, mode, estimate)
    (out / "summary.txt").write_text("\n".join(session.summary) + "\n")
    print(f"gpu_session: done in {elapsed:.0f} s, results in {out}")
    print((out / "report.md").read_text())
    return 1 if stop or any("exit 1" in s or "timed out" in s for s in session.summary) else 0


if __name__ == "__main__":
    run(main)
