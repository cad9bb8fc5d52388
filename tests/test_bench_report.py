"""scripts/bench_report.py on a small --benchmark-json file written here: tables and plots."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_report.py"


def _kernel(impl, size, value, **extra):
    return {"kernel": "attention", "pass": "fwd", "impl": impl, "x_label": "T", "size": size,
            "metric": "TFLOP/s", "value": value, "median_ms": 1.0, "dtype": "bfloat16", "quick": False, **extra}


def _bench(name, extra_info, median=0.001):
    return {"group": "g", "name": name, "fullname": f"bench/x.py::{name}", "params": {}, "param": None,
            "extra_info": extra_info, "stats": {"median": median, "min": median, "max": median, "rounds": 3}}


def _write_json(path: Path) -> None:
    benchmarks = [
        _bench("t1", _kernel("triton", 512, 150.5, vs_sdpa=1.25, vs_eager=9.5, peak_extra_mb=3.0)),
        _bench("t2", _kernel("triton", 2048, 201.0, vs_sdpa=0.875, vs_eager=31.0, peak_extra_mb=12.0)),
        _bench("s1", _kernel("sdpa", 512, 120.4, vs_sdpa=1.0, vs_eager=7.6, peak_extra_mb=4.0)),
        _bench("s2", _kernel("sdpa", 2048, 229.7, vs_sdpa=1.0, vs_eager=35.4, peak_extra_mb=16.0)),
        _bench("g1", {"bench": "generate", "impl": "torch", "kv_cache": False, "model": "gpt2-124M",
                      "batch": 1, "new_tokens": 200, "tokens_per_s": 4.25, "quick": False}),
        _bench("g2", {"bench": "generate", "impl": "torch", "kv_cache": True, "model": "gpt2-124M",
                      "batch": 1, "new_tokens": 200, "tokens_per_s": 38.5, "vs_no_cache": 9.06, "quick": False}),
        _bench("tr", {"bench": "train", "impl": "fused", "model": "gpt2-124M", "batch": 8, "seq_len": 1024,
                      "tokens_per_s": 123456.0, "mfu": 0.4125, "peak_mem_mb": 20480.5, "vs_torch": 1.1}),
    ]
    data = {"machine_info": {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0"},
            "commit_info": {"id": "abc123"}, "benchmarks": benchmarks, "datetime": "2026-01-02T03:04:05",
            "version": "5.2.3"}
    path.write_text(json.dumps(data))


def test_report_tables_and_plot(tmp_path):
    src = tmp_path / "bench.json"
    _write_json(src)
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, str(SCRIPT), str(src), "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [f"wrote {out / name}" for name in ("report.md", "attention_fwd.png", "end_to_end.png")]
    md = (out / "report.md").read_text()

    for fact in ("NVIDIA H100 80GB HBM3", "torch: 2.11.0", "triton: 3.6.0", "2026-01-02"):
        assert fact in md
    # Kernel table: one row per size, ours first, then each baseline, ratios of ours in the baselines' order.
    assert ("| T | triton (TFLOP/s) | sdpa (TFLOP/s) | triton vs sdpa | triton vs eager "
            "| triton peak MiB | sdpa peak MiB |") in md
    assert "| 512 | 150.5 | 120.4 | 1.25 | 9.5 | 3 | 4 |" in md
    assert "| 2048 | 201 | 229.7 | 0.875 | 31 | 12 | 16 |" in md
    assert md.index("| 512 |") < md.index("| 2048 |")
    assert "![attention fwd](attention_fwd.png)" in md
    # End-to-end tables: one per bench, the chosen columns in order.
    assert "### generate (gpt2-124M)" in md and "### train (gpt2-124M)" in md
    assert "| impl | kv_cache | batch | new_tokens | tokens_per_s | vs_no_cache |" in md
    assert "| torch | no | 1 | 200 | 4.25 | - |" in md
    assert "| torch | yes | 1 | 200 | 38.5 | 9.06 |" in md
    assert "| fused | 8 | 1024 | 123,456 | 0.4125 | 20,480 | 1.1 |" in md

    # The plot: one line per implementation, in matplotlib's first two cycle colours; no third line.
    import matplotlib.image as mpimg
    import numpy as np

    png = out / "attention_fwd.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(png)[..., :3]
    assert img.shape[:2] == (420, 640)

    def has_colour(hex_rgb):
        rgb = np.array([int(hex_rgb[i:i + 2], 16) / 255 for i in (1, 3, 5)])
        return bool((np.abs(img - rgb).max(axis=-1) < 0.02).any())

    assert has_colour("#1f77b4") and has_colour("#ff7f0e")  # triton, sdpa
    assert not has_colour("#2ca02c")
    assert sorted(p.name for p in out.glob("*.png")) == ["attention_fwd.png", "end_to_end.png"]
    assert "![end to end](end_to_end.png)" in md


def test_report_handles_empty_and_rejects_foreign_json(tmp_path, capsys):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import bench_report
    finally:
        sys.path.remove(str(SCRIPT.parent))

    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"machine_info": {}, "benchmarks": []}))
    assert bench_report.main([str(empty)]) == 0
    assert "No benchmark results" in (tmp_path / "report.md").read_text()
    assert "no plots: the results hold no benchmark" in capsys.readouterr().out  # says why, not silence
    assert list(tmp_path.glob("*.png")) == []

    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"hello": 1}))
    assert bench_report.main([str(foreign)]) == 2
    assert "not a pytest-benchmark JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_report.main([])


def test_parts_of_one_session_merge_and_devices_do_not(tmp_path, capsys):
    """A session benched in several runs (each within a time limit) gives one report; runs on two
    devices are refused rather than put in one table."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import bench_report
    finally:
        sys.path.remove(str(SCRIPT.parent))

    whole = tmp_path / "whole.json"
    _write_json(whole)
    data = json.loads(whole.read_text())
    kernels, e2e = data["benchmarks"][:4], data["benchmarks"][4:]
    paths = []
    for i, (part, commit) in enumerate([(kernels, "abc123"), (e2e, "def456")]):
        paths.append(tmp_path / f"part{i}.json")
        paths[-1].write_text(json.dumps({**data, "benchmarks": part, "commit_info": {"id": commit}}))
    assert bench_report.main([*map(str, paths), "--out", str(tmp_path / "merged")]) == 0
    md = (tmp_path / "merged" / "report.md").read_text()
    assert "| 2048 | 201 | 229.7 | 0.875 | 31 | 12 | 16 |" in md  # from part 0
    assert "| torch | yes | 1 | 200 | 38.5 | 9.06 |" in md  # from part 1
    assert "commit: abc123, def456" in md

    other = tmp_path / "other.json"
    other.write_text(json.dumps({**data, "machine_info": {"device": "NVIDIA A100-SXM4-80GB"}}))
    assert bench_report.main([str(paths[0]), str(other), "--out", str(tmp_path / "no")]) == 2
    assert "report each device on its own" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


def _load_script():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import bench_report
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return bench_report


def _bar_height(img, hex_rgb, columns: slice) -> int:
    """Height in pixels of the tallest bar of one colour within a band of the image's columns. Bars
    stand on the axis, so only runs of the colour that start at its lowest row count (the legend's
    patch of the same colour floats above)."""
    import numpy as np

    rgb = np.array([int(hex_rgb[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    mask = np.abs(img[:, columns] - rgb).max(axis=-1) < 0.02  # (H, W)
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return 0
    bottom = rows.max()
    heights = [0]
    for col in np.flatnonzero(mask[bottom]):
        above = mask[: bottom + 1, col][::-1]  # from the axis upwards
        heights.append(int(np.argmin(above)) if not above.all() else above.size)
    return max(heights)


def test_cpu_results_get_the_end_to_end_plot(tmp_path, capsys):
    """A CPU session has no kernel benches (skipped without CUDA) but its end-to-end figures are
    plotted: the training step's tokens/s, and generation without and with the cache, bar heights
    in proportion to the figures."""
    import matplotlib.image as mpimg

    bench_report = _load_script()
    rows = [
        _bench("tr", {"bench": "train", "impl": "torch", "model": "gpt2-124M", "batch": 1, "seq_len": 128,
                      "dtype": "fp32", "tokens_per_s": 120.0, "step_ms": 1066.7}),
        _bench("g1", {"bench": "generate", "impl": "torch", "kv_cache": False, "cuda_graph": False,
                      "model": "gpt2-124M", "batch": 1, "new_tokens": 200, "tokens_per_s": 5.0}),
        _bench("g2", {"bench": "generate", "impl": "torch", "kv_cache": True, "cuda_graph": False,
                      "model": "gpt2-124M", "batch": 1, "new_tokens": 200, "tokens_per_s": 20.0, "vs_no_cache": 4.0}),
    ]
    src = tmp_path / "cpu.json"
    src.write_text(json.dumps({"machine_info": {"device": "cpu"}, "benchmarks": rows}))
    out = tmp_path / "out"
    assert bench_report.main([str(src), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out / 'end_to_end.png'}" in printed
    assert "no kernel plots" in printed and "without CUDA" in printed  # and why there is no other
    assert sorted(p.name for p in out.glob("*.png")) == ["end_to_end.png"]
    assert "![end to end](end_to_end.png)" in (out / "report.md").read_text()

    img = mpimg.imread(out / "end_to_end.png")[..., :3]
    assert img.shape[:2] == (420, 1280)  # two panels: train, generate
    left, right = slice(0, 640), slice(640, 1280)
    train = _bar_height(img, "#1f77b4", left)
    assert _bar_height(img, "#ff7f0e", left) == 0  # one series in the training panel
    no_cache, cached = _bar_height(img, "#1f77b4", right), _bar_height(img, "#ff7f0e", right)
    assert no_cache > 0 and cached / no_cache == pytest.approx(20.0 / 5.0, rel=0.05)
    assert train == pytest.approx(cached, abs=2)  # each panel scales to its own largest bar
