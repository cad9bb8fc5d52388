"""The pictures of `scripts/explain.py`: each function draws one PNG from traced facts and returns its path."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

FULL, MASKED, SKIPPED = "#4c9f70", "#f0a030", "#e8e8e8"
DPI = 90


def _save(fig, out: str, name: str, rect=None) -> str:
    """Lay the figure out, write it as out/name, free it; its path."""
    fig.tight_layout(rect=rect)
    path = os.path.join(out, name)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _legend(fig):
    fig.legend(handles=[Patch(color=FULL, label="computed, no mask"), Patch(color=MASKED, label="computed with a mask"),
                        Patch(color=SKIPPED, label="skipped (never loaded)")],
               loc="lower center", ncol=3, fontsize=8, frameon=False)


def _grid(ax, cells: dict, n_rows: int, n_cols: int, Tq: int, Tk: int, bm: int, bn: int, title: str,
          order: dict | None = None):
    """cells: {(query tile, key tile): masked}; order: {(query tile, key tile): visit number}."""
    for i in range(n_rows):
        for j in range(n_cols):
            state = cells.get((i, j))
            color = SKIPPED if state is None else (MASKED if state else FULL)
            ax.add_patch(Rectangle((j, i), 1, 1, facecolor=color, edgecolor="white", lw=1.5))
            if order and (i, j) in order:
                ax.text(j + 0.5, i + 0.5, str(order[(i, j)]), ha="center", va="center", fontsize=8)
    # The causal boundary, key j = query i + (Tk - Tq), in tile units.
    diag = Tk - Tq
    ax.plot([diag / bn, (Tq + diag) / bn], [0, Tq / bm], color="#b03030", lw=1.2, label="j = i + (Tk - Tq)")
    ax.set_xlim(0, n_cols)
    ax.set_ylim(n_rows, 0)
    ax.set_aspect("equal")
    ax.set_xticks([j + 0.5 for j in range(n_cols)], [str(j) for j in range(n_cols)], fontsize=7)
    ax.set_yticks([i + 0.5 for i in range(n_rows)], [str(i) for i in range(n_rows)], fontsize=7)
    ax.set_xlabel(f"key tile (BLOCK_N = {bn}, Tk = {Tk})", fontsize=8)
    ax.set_ylabel(f"query tile (BLOCK_M = {bm}, Tq = {Tq})", fontsize=8)
    ax.set_title(title, fontsize=9)


def _cells_by_query(sched: dict) -> dict:
    return {(i, j): masked for i, visits in sched.items() for j, masked, _ in visits}


def attention_tiles(schedules: dict, out: str) -> str:
    """The forward's (query tile, key tile) pairs: Tq == Tk, and a prefill against a longer cache."""
    panels = [("fwd", "causal, Tq == Tk")] + ([("prefill", "prefill against a KV cache (bottom-right)")]
                                               if "prefill" in schedules else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 4.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        sched, Tq, Tk, bm, bn = schedules[key]
        cells = _cells_by_query(sched)
        n_rows, n_cols = -(-Tq // bm), -(-Tk // bn)
        _grid(ax, cells, n_rows, n_cols, Tq, Tk, bm, bn,
              f"{title}\n{len(cells)} of {n_rows * n_cols} tile pairs computed")
    fig.suptitle("flash attention forward: one program per query tile (row)", fontsize=10)
    _legend(fig)
    return _save(fig, out, "flash_attention_tiles.png", rect=(0, 0.06, 1, 1))


def backward_orders(schedules: dict, out: str) -> str:
    """The backward's visiting orders: dK/dV walks query tiles per key tile, dQ key tiles per query tile."""
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 4.8))
    sched, Tq, Tk, bm, bn = schedules["dkdv"]
    cells = {(i, j): masked for j, visits in sched.items() for i, masked, _ in visits}
    order = {(i, j): n + 1 for j, visits in sched.items() for n, (i, _, _) in enumerate(visits)}
    _grid(axes[0], cells, -(-Tq // bm), -(-Tk // bn), Tq, Tk, bm, bn,
          "dK/dV: one program per key tile (column),\nnumbers: the order it visits query tiles", order)
    sched, Tq, Tk, bm, bn = schedules["dq"]
    cells = _cells_by_query(sched)
    order = {(i, j): n + 1 for i, visits in sched.items() for n, (j, _, _) in enumerate(visits)}
    _grid(axes[1], cells, -(-Tq // bm), -(-Tk // bn), Tq, Tk, bm, bn,
          "dQ: one program per query tile (row),\nnumbers: the order it visits key tiles", order)
    _legend(fig)
    return _save(fig, out, "flash_attention_backward.png", rect=(0, 0.06, 1, 1))


def online_softmax(state: dict, out: str) -> str:
    """m, l and alpha of one query row after each key tile, ending at the saved log-sum-exp."""
    steps = state["steps"]
    x = list(range(1, len(steps) + 1))
    fig, axes = plt.subplots(3, 1, figsize=(5.5, 5.6), sharex=True)
    axes[0].plot(x, [s["m"] for s in steps], "o-", label="running max m")
    axes[0].plot(x, [s["m"] + __import__("math").log2(s["l"]) for s in steps], "s--", label="m + log2 l")
    axes[0].axhline(state["saved_lse2"], color="#b03030", lw=1, label=f"saved LSE2 = {state['saved_lse2']:.4f}")
    axes[0].legend(fontsize=7)
    axes[0].set_ylabel("base-2 units", fontsize=8)
    axes[1].plot(x, [s["l"] for s in steps], "o-", color="#4c72b0")
    axes[1].set_ylabel("running sum l", fontsize=8)
    axes[2].bar(x, [s["alpha"] for s in steps], color=[MASKED if s["masked"] else FULL for s in steps])
    axes[2].set_ylabel("alpha = 2^(m - m')", fontsize=8)
    axes[2].set_ylim(0, 1.05)
    axes[2].set_xticks(x, [f"{s['tile']}" for s in steps], fontsize=7)
    axes[2].set_xlabel("after key tile (orange: the masked stage)", fontsize=8)
    fig.suptitle(f"online softmax of query row {state['row']}", fontsize=10)
    return _save(fig, out, "flash_attention_online_softmax.png")


def decode_splits(reads: dict, lens: list, L: int, ns: int, bn: int, combine: dict, out: str) -> str:
    """Which split read which stretch of each sequence's cache, and the exact combine's weights."""
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 1.0 + 0.6 * len(lens) + 1.6), gridspec_kw={"width_ratios": [3, 1.3]})
    ax = axes[0]
    cmap = plt.get_cmap("tab10")
    for b, n in enumerate(lens):
        ax.add_patch(Rectangle((n, b - 0.35), L - n, 0.7, facecolor=SKIPPED, hatch="//", edgecolor="#bbbbbb"))
        for s in range(ns):
            r = reads.get((b, s))
            if r:
                ax.add_patch(Rectangle((r[0], b - 0.35), r[1] - r[0], 0.7, facecolor=cmap(s % 10), edgecolor="white"))
                ax.text((r[0] + r[1]) / 2, b, f"s{s}", ha="center", va="center", fontsize=7, color="white")
    ax.set_xlim(0, L)
    ax.set_ylim(len(lens) - 0.5, -0.5)
    ax.set_yticks(range(len(lens)), [f"seq {b}: {n} keys" for b, n in enumerate(lens)], fontsize=8)
    ax.set_xlabel(f"cache row (L_max = {L}; {ns} splits of key blocks of {bn}; hatched: past the sequence, never read)",
                  fontsize=8)
    ax.set_title("split kernel: one program per (sequence, head, split)", fontsize=9)
    ax = axes[1]
    w = combine["weights"]
    ax.bar(range(len(w)), w, color=[cmap(s % 10) for s in range(len(w))])
    ax.set_xticks(range(len(w)), [f"s{s}" for s in range(len(w))], fontsize=7)
    ax.set_ylabel("w_i = 2^(lse_i - max) / sum", fontsize=8)
    ax.set_title(f"combine (seq 0, head 0): sum_i w_i o_i\n= kernel output to {combine['max_abs_diff_vs_kernel']:.1e}",
                 fontsize=9)
    return _save(fig, out, "decode_attention_splits.png")


def rowwise_bytes(rep, out: str) -> str:
    """Bytes per tensor of the fused kernels, and fused against the unfused PyTorch sequences."""
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.8), gridspec_kw={"width_ratios": [1.3, 1]})
    ax = axes[0]
    labels, reads, writes = [], [], []
    for k in rep.kernels:
        for a, rw in k.measured.items():
            labels.append(f"{k.label.split(' ')[0]}:{a}")
            reads.append(rw["read"] / 1024)
            writes.append(rw["written"] / 1024)
    y = range(len(labels))
    ax.barh(y, reads, color="#4c72b0", label="read")
    ax.barh(y, writes, left=reads, color="#dd8452", label="written")
    ax.set_yticks(list(y), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("KiB (traced, per kernel argument)", fontsize=8)
    ax.set_title(f"fused {rep.op}: bytes per tensor", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1]
    tot = rep.measured_totals()
    dist = {"read": 0, "written": 0}
    for k in rep.kernels:
        for rw in k.distinct.values():
            dist["read"] += rw["read"]
            dist["written"] += rw["written"]
    unf = rep.extra.get("unfused", {})
    names = list(unf) + ["fused (traced)"]
    rd = [v["read"] for v in unf.values()] + [tot["read"]]
    wr = [v["written"] for v in unf.values()] + [tot["written"]]
    if all(k.distinct for k in rep.kernels):  # (not for linear_cross_entropy's matmuls: torch ops)
        names.append("fused (distinct elements)")
        rd.append(dist["read"])
        wr.append(dist["written"])
    names.append("physical minimum")
    rd.append(rep.minimum["read"])
    wr.append(rep.minimum["written"])
    y = range(len(names))
    ax.barh(y, [r / 1024 for r in rd], color="#4c72b0", label="read")
    ax.barh(y, [w / 1024 for w in wr], left=[r / 1024 for r in rd], color="#dd8452", label="written")
    for i, (r, w) in enumerate(zip(rd, wr)):
        ax.text((r + w) / 1024, i, f" {(r + w) / 1024:,.0f}", va="center", fontsize=7)
    ax.set_yticks(list(y), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, max(r + w for r, w in zip(rd, wr)) / 1024 * 1.25)
    ax.set_xlabel("KiB read + written", fontsize=8)
    ax.set_title("fused vs unfused" + (" (forward + backward)" if rep.backward else " (forward)"), fontsize=9)
    return _save(fig, out, f"{rep.op}_bytes.png")
