"""Compile every kernel variant the launchers run at GPT-2's shapes for sm_80 and sm_90; print (and
save) registers, spills, shared memory, blocks and warps per SM, and the instruction mix.

    python scripts/compile_report.py                          # everything, both targets: a table
    python scripts/compile_report.py --json bench/results/compile-report.json --workers 2
    python scripts/compile_report.py --kernel decode_attention --target sm_90
    python scripts/compile_report.py --first-spec-only        # each lesson's first call: what CI checks

No GPU needed: see tools/compile_check.py for how and why. Exits 1 if any variant fails (shared
memory over the target's limit, spilled registers, a compile error) or a kernel module fails to
import, lists no COMPILE_SPECS, or has a kernel no spec launches.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model.cli import run  # noqa: E402
from tools import compile_check as cc  # noqa: E402


def _commit() -> str:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernel", help="only specs whose module or spec name contains this (e.g. layer_norm, train.bf16)")
    ap.add_argument("--target", action="append", choices=list(cc.TARGETS),
                    help="a target to compile for (repeatable; default: all)")
    ap.add_argument("--workers", type=int, default=2, help="compile processes (default 2)")
    ap.add_argument("--first-spec-only", action="store_true", help="each lesson's first spec only (CI's quick check)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds one compile may take (default 300)")
    ap.add_argument("--json", metavar="FILE", help="write every result (with the instruction mix) to FILE")
    ap.add_argument("--markdown", metavar="FILE", help="also write the table to FILE as Markdown")
    ap.add_argument("--warm-cache", action="store_true",
                    help="use Triton's own cache (default: a fresh one, so compile_s is a cold compile)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    args = ap.parse_args(argv)
    if args.workers < 1:
        raise ValueError("--workers must be >= 1")

    start = time.time()
    done = [0]

    def progress(r):
        done[0] += 1
        if not args.quiet:
            print(f"[{time.time() - start:6.0f}s] {done[0]:4d} {r.status:<4} {r.kernel} {r.dtype} {r.config} {r.target}"
                  f" ({r.compile_s}s)", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="compile-report-cache-") as cache:
        env = {} if args.warm_cache else {"TRITON_CACHE_DIR": cache}
        report = cc.run_check(kernel=args.kernel, targets=tuple(args.target or cc.TARGETS), workers=args.workers,
                              first_spec_only=args.first_spec_only, timeout=args.timeout, on_result=progress, env=env)
    if not report.results:
        raise ValueError(f"no kernel matches {args.kernel!r}")
    print(cc.format_table(report))
    print("\nper kernel, dtype and target:")
    for line in cc.summarise(report.results):
        print("  " + line)
    notes = sorted({(r.kernel, r.dtype, r.target, r.note) for r in report.results if r.note})
    if notes:
        print("\nnotes:")
        for kernel, dtype, target, note in notes:
            print(f"  {kernel} {dtype} {target}: {note}")
    failures = report.failures
    if failures:
        print(f"\n{len(failures)} failure(s):")
        for r in failures:
            where = " ".join(x for x in (r.kernel, r.dtype, r.config, r.target) if x)
            print(f"  {r.status}: {where}: {r.error}")
    elapsed = time.time() - start
    n_ok = len(report.results) - len(failures)
    print(f"\n{n_ok} OK, {len(failures)} failed, in {elapsed:.0f}s")
    if args.json:
        meta = {"command": "python scripts/compile_report.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpu": platform.processor() or platform.machine(),
                "commit": _commit(), "workers": args.workers, "cold_cache": not args.warm_cache, "wall_s": round(elapsed)}
        Path(args.json).write_text(json.dumps(cc.to_json(report, **meta), indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.markdown:
        Path(args.markdown).write_text(cc.format_table(report, markdown=True) + "\n")
        print(f"wrote {args.markdown}")
    return 1 if failures else 0


if __name__ == "__main__":
    run(main)
