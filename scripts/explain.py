"""Run one kernel in Triton's interpreter, watch every tile it moves, count its bytes and FLOPs, draw it.

    python scripts/explain.py flash_attention                      # forward, B,H,Tq,Tk,D = 1,1,256,256,64
    python scripts/explain.py flash_attention --backward --shape 1,1,200,200,64 --dtype bf16
    python scripts/explain.py decode_attention --lens 300,150
    python scripts/explain.py layer_norm --backward --json ln.json --out docs/lessons
    python scripts/explain.py cross_entropy --shape 16,5000

KERNEL: flash_attention, decode_attention, layer_norm, add_layer_norm, bias_gelu, cross_entropy,
linear_cross_entropy. Prints, per launch, the block sizes, the bytes read and written per tensor and
the tl.dot FLOPs measured from the trace next to the lesson's formula (each kernel file's
`memory_traffic` / `flops`), then the physical minimum and the lower bound on time on an H100 and an
H200. Pictures go to --out (default: a new temporary folder, printed). How it works: tools/trace.py
(the tracer) and tools/explain.py (the runs and counts). Runs on a CPU: the interpreter is the point.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.cli import UsageError, run  # noqa: E402


def _ints(text: str) -> tuple:
    try:
        return tuple(int(t) for t in text.split(","))
    except ValueError:
        raise UsageError(f"expected comma-separated integers, got {text!r}") from None


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        # The tracer watches the interpreter: switch it on before anything imports triton.
        os.environ["TRITON_INTERPRET"] = "1"
    from tools import explain as ex

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("kernel", choices=ex.OPS)
    p.add_argument("--shape", help="comma-separated: " + "; ".join(f"{k}: {v}" for k, v in ex.SHAPE_NAMES.items()))
    p.add_argument("--dtype", default="float32", choices=sorted(ex.DTYPES))
    p.add_argument("--backward", action="store_true", help="also trace the backward kernels")
    p.add_argument("--out", help="folder for the PNGs (default: a new temporary folder)")
    p.add_argument("--no-plots", action="store_true", help="count only")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefill", type=int, help="flash_attention: queries of the prefill case, against the Tk keys (default Tq/2)")
    p.add_argument("--row", type=int, help="flash_attention: the query row of the online-softmax picture (default Tq-1)")
    p.add_argument("--non-causal", action="store_true", help="flash_attention: no causal mask")
    p.add_argument("--lens", help="decode_attention: the B sequence lengths, comma-separated")
    args = p.parse_args(argv)

    options = {}
    if args.prefill is not None:
        options["prefill"] = args.prefill
    if args.row is not None:
        options["row"] = args.row
    if args.lens:
        options["seq_lens"] = _ints(args.lens)
    if args.non_causal:
        options["causal"] = False
    wrong = {"prefill", "row", "causal"} & set(options) if args.kernel != "flash_attention" else set()
    wrong |= {"seq_lens"} & set(options) if args.kernel != "decode_attention" else set()
    if wrong:
        raise UsageError(f"{args.kernel} does not take --{', --'.join(sorted(wrong)).replace('seq_lens', 'lens').replace('causal', 'non-causal')}")
    if args.row is not None:
        shape = _ints(args.shape) if args.shape else ex.DEFAULT_SHAPES["flash_attention"]
        if not 0 <= args.row < shape[2]:
            raise UsageError(f"--row must be in [0, Tq = {shape[2]})")
    out = None if args.no_plots else (args.out or tempfile.mkdtemp(prefix=f"explain_{args.kernel}_"))
    rep = ex.explain(args.kernel, _ints(args.shape) if args.shape else None, ex.DTYPES[args.dtype],
                     args.backward, out, args.seed, **options)
    print(ex.format_report(rep))
    if args.json:
        Path(args.json).write_text(json.dumps(rep.to_json(), indent=1))
        print(f"wrote {args.json}")
    return 0 if all(k.matches for k in rep.kernels) else 1


if __name__ == "__main__":
    run(main)
