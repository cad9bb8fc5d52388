"""Turn `pytest bench/ --benchmark-json FILE` output into a markdown report and PNG plots.

    python scripts/bench_report.py bench/results/<device>-<date>/bench.json [--out DIR]
    python scripts/bench_report.py part1.json part2.json ... --out DIR   # one session run in parts

Several files (a session split into runs that each fit a time limit, e.g. `BENCH_ARGS="-k attention"`)
are merged into one report; they must come from the same device. Writes DIR/report.md (default: the
first JSON's folder) and the plots:

  DIR/<kernel>_<pass>.png  per kernel and pass: throughput (TFLOP/s or GB/s) against size, one line per
                           implementation, like the plots of the Triton tutorials (GPU runs: on a CPU
                           the kernel benches are skipped, as the interpreter's times say nothing)
  DIR/end_to_end.png       tokens/s of every end-to-end bench (training step; generation with and
                           without the KV cache), one panel per bench: on any machine, a CPU included

and prints each file it wrote, or why it wrote no plot. Reads only what the benches put in
`extra_info` (see bench/bench_util.py):

  kernel benches:      kernel, pass, impl, x_label, size, metric, value, vs_<baseline>, peak_extra_mb
  end-to-end benches:  bench ("train" / "generate"), impl, tokens_per_s, mfu, vs_<baseline>, ...
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

OURS = "triton"  # the implementation whose ratios to the baselines the tables show
# Columns of the end-to-end tables, in this order when present (any other extra_info key follows).
E2E_COLUMNS = [
    "impl", "kv_cache", "cuda_graph", "batch", "seq_len", "prompt_tokens", "new_tokens", "dtype", "tokens_per_s",
    "step_ms", "seconds", "model_tflops", "mfu", "peak_mem_mb",
]
E2E_HIDDEN = {"bench", "model", "device", "quick", "peak_bf16_tflops"}


def load(path: Path) -> dict:
    data = json.loads(Path(path).read_text())
    if "benchmarks" not in data:
        raise ValueError(f"{path}: not a pytest-benchmark JSON file (no 'benchmarks' key)")
    return data


def merge(parts: list[tuple[Path, dict]]) -> dict:
    """One report's data from several runs of the same session: their benchmarks together, the
    first run's facts. Runs on different devices are refused: their numbers must not share a table."""
    (first_path, first), rest = parts[0], parts[1:]
    device = (first.get("machine_info") or {}).get("device", "")
    for path, data in rest:
        other = (data.get("machine_info") or {}).get("device", "")
        if other != device:
            raise ValueError(f"{path} was measured on {other or 'an unnamed device'!r} but {first_path} on "
                             f"{device or 'an unnamed device'!r}; report each device on its own")
    commits = {(d.get("commit_info") or {}).get("id") for _, d in parts} - {None}
    merged = {**first, "benchmarks": [b for _, d in parts for b in d["benchmarks"]]}
    if len(commits) > 1:
        merged["commit_info"] = {**(first.get("commit_info") or {}), "id": ", ".join(sorted(commits))}
    return merged


def kernel_series(benchmarks: list[dict]) -> dict:
    """{(kernel, pass): {"metric", "x_label", "dtype", "rows": {size: {impl: extra_info}}}}."""
    out: dict = {}
    for b in benchmarks:
        ei = b.get("extra_info") or {}
        if "kernel" not in ei or "value" not in ei:
            continue
        key = (ei["kernel"], ei["pass"])
        s = out.setdefault(key, {"metric": ei["metric"], "x_label": ei["x_label"], "dtype": ei.get("dtype", ""),
                                 "rows": defaultdict(dict)})
        s["rows"][int(ei["size"])][ei["impl"]] = ei
    return out


def _impls(series: dict) -> list[str]:
    """Implementations in order of first appearance, ours first."""
    seen: list[str] = []
    for by_impl in series["rows"].values():
        for impl in by_impl:
            if impl not in seen:
                seen.append(impl)
    return sorted(seen, key=lambda i: i != OURS)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines


def kernel_table(kernel: str, pass_: str, series: dict) -> list[str]:
    impls = _impls(series)
    ours = [ei for by_impl in series["rows"].values() for i, ei in by_impl.items() if i == OURS]
    ratios = list(dict.fromkeys(k for ei in ours for k in ei if k.startswith("vs_")))  # baselines' order
    header = [series["x_label"]] + [f"{i} ({series['metric']})" for i in impls]
    header += [f"{OURS} {r.replace('_', ' ', 1)}" for r in ratios]
    header += [f"{i} peak MiB" for i in impls]
    rows = []
    for size in sorted(series["rows"]):
        by_impl = series["rows"][size]
        row = [size] + [by_impl.get(i, {}).get("value") for i in impls]
        row += [by_impl.get(OURS, {}).get(r) for r in ratios]
        row += [by_impl.get(i, {}).get("peak_extra_mb") for i in impls]
        rows.append(row)
    lines = [f"### {kernel}, {pass_} ({series['dtype']}; {series['metric']}, higher is better)", ""]
    lines += _table(header, rows)
    lines += ["", f"![{kernel} {pass_}]({plot_name(kernel, pass_)})", ""]
    return lines


def e2e_tables(benchmarks: list[dict]) -> list[str]:
    groups: dict[str, list[tuple[dict, dict]]] = defaultdict(list)
    for b in benchmarks:
        ei = b.get("extra_info") or {}
        if "bench" in ei:
            groups[ei["bench"]].append((ei, b.get("stats") or {}))
    lines = []
    for bench, items in groups.items():
        keys = [k for k in E2E_COLUMNS if any(k in ei for ei, _ in items)]
        keys += sorted({k for ei, _ in items for k in ei} - set(keys) - E2E_HIDDEN)
        models = sorted({ei.get("model", "") for ei, _ in items})
        lines += [f"### {bench} ({', '.join(models)})", ""]
        lines += _table(keys, [[ei.get(k) for k in keys] for ei, _ in items])
        lines.append("")
    return lines


E2E_PLOT = "end_to_end.png"
# Fields that tell an end-to-end bench's rows apart on the plot's x axis (when they vary within it).
E2E_LABELS = {"impl": "{}", "batch": "B={}", "seq_len": "T={}", "prompt_tokens": "prompt {}",
              "new_tokens": "{} new", "dtype": "{}"}


def e2e_throughputs(benchmarks: list[dict]) -> dict[str, list[dict]]:
    """{bench: [extra_info, ...]} of the end-to-end rows that have a tokens/s figure."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for b in benchmarks:
        ei = b.get("extra_info") or {}
        if "bench" in ei and isinstance(ei.get("tokens_per_s"), (int, float)):
            groups[ei["bench"]].append(ei)
    return dict(groups)


def decode_mode(ei: dict) -> str:
    """How a generation row decodes (the bars' colour); "" for rows of other benches."""
    if "kv_cache" not in ei:
        return ""
    return "CUDA graph" if ei.get("cuda_graph") else "KV cache" if ei["kv_cache"] else "no cache"


def plot_e2e(groups: dict[str, list[dict]], path: Path, device: str = "") -> None:
    """One panel per bench: bars of tokens/s, one group per configuration, one colour per decode mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(6.4 * len(groups), 4.2), dpi=100, squeeze=False)
    for ax, (bench, rows) in zip(axes[0], groups.items()):
        fields = [f for f in E2E_LABELS if f == "impl" or len({str(r.get(f)) for r in rows}) > 1]

        def label(r):
            return " ".join(E2E_LABELS[f].format(r[f]) for f in fields if f in r)

        cats = list(dict.fromkeys(label(r) for r in rows))
        modes = list(dict.fromkeys(decode_mode(r) for r in rows))
        value = {(label(r), decode_mode(r)): r["tokens_per_s"] for r in rows}
        width = 0.8 / len(modes)
        for j, mode in enumerate(modes):
            xs = [i for i, c in enumerate(cats) if (c, mode) in value]
            bars = ax.bar([x - 0.4 + width * (j + 0.5) for x in xs], [value[cats[x], mode] for x in xs], width,
                          label=mode or "tokens/s")
            ax.bar_label(bars, labels=[_fmt(value[cats[x], mode]) for x in xs], fontsize=8)
        ax.set_xticks(range(len(cats)), cats)
        ax.set_ylabel("tokens/s (higher is better)")
        # What all its rows share goes in the panel's title: the model, and e.g. "B=1 T=128".
        shared = sorted({str(r.get("model", "")) for r in rows} - {""})
        shared += [E2E_LABELS[f].format(rows[0][f]) for f in E2E_LABELS
                   if f not in fields and all(f in r for r in rows) and len({str(r[f]) for r in rows}) == 1]
        quick = " - quick: one untimed run" if any(r.get("quick") for r in rows) else ""
        ax.set_title(f"{bench}" + (f" ({', '.join(shared)})" if shared else "") + quick)
        ax.set_ylim(top=ax.get_ylim()[1] * 1.12)  # room for the value labels
        ax.set_axisbelow(True)  # grid lines behind the bars, not across them
        ax.grid(True, axis="y", alpha=0.3)
        if len(modes) > 1:
            ax.legend()
    if device:
        fig.suptitle(f"end to end on {device}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_name(kernel: str, pass_: str) -> str:
    return f"{kernel}_{pass_.replace('+', '_')}.png"


def plot_kernel(kernel: str, pass_: str, series: dict, path: Path, device: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    for impl in _impls(series):
        pts = sorted((size, by_impl[impl]["value"]) for size, by_impl in series["rows"].items() if impl in by_impl)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linewidth=2, label=impl)
    ax.set_xscale("log", base=2)
    sizes = sorted(series["rows"])
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.minorticks_off()
    ax.set_xlabel(series["x_label"])
    ax.set_ylabel(series["metric"])
    ax.set_ylim(bottom=0)
    ax.set_title(f"{kernel} {pass_} ({series['dtype']})" + (f" on {device}" if device else ""))
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report(data: dict, out: Path) -> tuple[Path, list[Path], list[str]]:
    """Write report.md and the plots into out; return the report's path, the plots' paths, and why
    a kind of plot was not drawn."""
    out.mkdir(parents=True, exist_ok=True)
    benchmarks = data["benchmarks"]
    mi = data.get("machine_info") or {}
    device = mi.get("device", "")
    lines = ["# Benchmark results", ""]
    facts = [("device", device), ("torch", mi.get("torch")), ("triton", mi.get("triton")),
             ("CUDA", mi.get("cuda")), ("date", data.get("datetime")),
             ("commit", (data.get("commit_info") or {}).get("id"))]
    lines += [f"- {k}: {v}" for k, v in facts if v]
    lines += ["", "Ratios (`vs X`) are median(X) / median(ours), both measured in the same session on the "
              "same inputs: above 1 means ours is faster. Peak MiB is the memory one call allocates on "
              "top of its inputs.", ""]
    if not benchmarks:
        lines += ["No benchmark results in this file (was it run with --benchmark-disable?).", ""]
    plots, why_not = [], []
    series_all = kernel_series(benchmarks)
    if series_all:
        lines += ["## Kernels", ""]
    elif benchmarks:
        why_not.append("no kernel plots: no kernel bench in the results (without CUDA they are skipped)")
    for (kernel, pass_), series in series_all.items():
        lines += kernel_table(kernel, pass_, series)
        plots.append(out / plot_name(kernel, pass_))
        plot_kernel(kernel, pass_, series, plots[-1], device)
    e2e = e2e_tables(benchmarks)
    if e2e:
        lines += ["## End to end", ""] + e2e
    throughputs = e2e_throughputs(benchmarks)
    if throughputs:
        plots.append(out / E2E_PLOT)
        plot_e2e(throughputs, plots[-1], device)
        lines += [f"![end to end]({E2E_PLOT})", ""]
    elif benchmarks:
        why_not.append("no end-to-end plot: no end-to-end bench (train, generate) with tokens_per_s in the results")
    if not benchmarks:
        why_not.append("no plots: the results hold no benchmark (a run with --benchmark-disable records none)")
    if any((b.get("extra_info") or {}).get("quick") for b in benchmarks):
        lines += ["Rows marked quick come from a single untimed run (--benchmark-disable): not measurements.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path, plots, why_not


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", type=Path, nargs="+",
                    help="output of pytest bench/ --benchmark-json FILE (several: parts of one session)")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: the first JSON's folder)")
    args = ap.parse_args(argv)
    try:
        data = merge([(p, load(p)) for p in args.json])
    except (OSError, ValueError) as err:
        print(f"bench_report: {err}", file=sys.stderr)
        return 2
    path, plots, why_not = report(data, args.out or args.json[0].parent)
    for written in (path, *plots):
        print(f"wrote {written}")
    for reason in why_not:
        print(reason)
    return 0


if __name__ == "__main__":
    sys.exit(main())
