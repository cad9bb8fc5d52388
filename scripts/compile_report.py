"""Compile every kernel configuration for sm_80 and sm_90 and print registers, spills, shared memory.

    python scripts/compile_report.py                          # everything, both targets
    python scripts/compile_report.py --kernel decode_attention --target sm_90
    python scripts/compile_report.py --markdown compile_report.md
    python scripts/compile_report.py --first-config-only      # each spec's default config: minutes, not a quarter hour

No GPU needed: see kernels/compile_check.py for how and why. Exits 1 if any configuration fails
(shared memory over the target's limit, spilled registers, a compile error) or if a kernel module is
missing, fails to import or lists no COMPILE_SPECS.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load_compile_check():
    # By file, not `import kernels.compile_check`: kernels/__init__.py imports every kernel module,
    # and a missing or broken one must show up in the report rather than stop it.
    spec = importlib.util.spec_from_file_location("compile_check", ROOT / "kernels" / "compile_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    cc = _load_compile_check()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernel", help="only specs whose module or spec name contains this (e.g. layer_norm, fwd.bf16)")
    ap.add_argument("--target", action="append", choices=list(cc.TARGETS),
                    help="a target to compile for (repeatable; default: all)")
    ap.add_argument("--workers", type=int, default=2, help="compile processes (default 2)")
    ap.add_argument("--first-config-only", action="store_true",
                    help="each spec's first (default) config only: what tests/test_compile.py checks in CI")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds one compile may take (default 300)")
    ap.add_argument("--markdown", metavar="FILE", help="also write the table to FILE as Markdown")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    args = ap.parse_args(argv)

    start = time.time()

    def progress(r):
        if not args.quiet:
            print(f"[{time.time() - start:6.1f}s] {r.status:<4} {r.kernel} {r.config} {r.target}", file=sys.stderr, flush=True)

    report = cc.run_check(kernel=args.kernel, targets=tuple(args.target or cc.TARGETS), workers=args.workers,
                          first_config_only=args.first_config_only, timeout=args.timeout, on_result=progress)
    if not report.results:
        print(f"no kernel matches {args.kernel!r}", file=sys.stderr)
        return 2
    print(cc.format_table(report))
    failures = report.failures
    if failures:
        print(f"\n{len(failures)} failure(s):")
        for r in failures:
            where = " ".join(x for x in (r.kernel, r.config, r.target) if x)
            print(f"  {r.status}: {where}: {r.error}")
    n_ok = len(report.results) - len(failures)
    print(f"\n{n_ok} OK, {len(failures)} failed, in {time.time() - start:.0f}s")
    if args.markdown:
        Path(args.markdown).write_text(cc.format_table(report, markdown=True) + "\n")
        print(f"wrote {args.markdown}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
