"""`benchmarks.gpu_sd15` (issue 17): the step tracer and the results table by default; `--small` end to end (slow)."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap

import pytest

from dreamsteer.benchmarks import gpu_sd15

STEP_SCRIPT = textwrap.dedent("""
    import sys, time
    import torch
    assert sys.argv[1:] == ["--pause", "0.15"], sys.argv
    ballast = torch.ones(256 * 2**20 // 4)  # 256 MiB, so the peak RSS must pass it
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=0.1)
    for pause in (0.3, 0.6, 0.6, 0.15, 0.15):
        time.sleep(pause)
        p.grad = torch.ones(3)
        opt.step()
    sys.exit(int(p[0].item() * -10 + 0.5) - 2)  # 5 SGD steps of 0.1: exit 3
""")


def test_trace_records_each_optimizer_step_and_the_peak(tmp_path):
    script, record = tmp_path / "train.py", tmp_path / "record.json"
    script.write_text(STEP_SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "dreamsteer.benchmarks.gpu_sd15", "--trace", str(record), "--", str(script),
                           "--pause", "0.15"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr  # the script's own exit status, after its 5 steps
    data = json.loads(record.read_text())
    ends = data["step_end_s"]
    assert len(ends) == 5 and data["exit"] == 3
    intervals = [b - a for a, b in zip(ends, ends[1:])]
    assert all(i >= pause for i, pause in zip(intervals, (0.6, 0.6, 0.15, 0.15)))
    assert data["peak_bytes"] > 256 * 2**20
    assert gpu_sd15.seconds_per_step(ends, warmup=2) == pytest.approx((intervals[2] + intervals[3]) / 2)  # the 0.6 s ones left out


def test_trace_records_a_failed_run_as_failed(tmp_path):
    script, record = tmp_path / "broken.py", tmp_path / "record.json"
    script.write_text("import torch\np = torch.nn.Parameter(torch.zeros(1))\np.grad = torch.ones(1)\n"
                      "torch.optim.SGD([p], lr=1.0).step()\nraise RuntimeError('boom after one step')\n")
    proc = subprocess.run([sys.executable, "-m", "dreamsteer.benchmarks.gpu_sd15", "--trace", str(record), "--", str(script)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "boom after one step" in proc.stderr
    data = json.loads(record.read_text())
    assert data["exit"] == 1 and len(data["step_end_s"]) == 1


def test_seconds_per_step_is_the_median_interval_after_warmup():
    assert gpu_sd15.seconds_per_step([0.0, 5.0, 6.0, 8.0, 9.0], warmup=1) == 1.0  # intervals 5 | 1, 2, 1
    assert gpu_sd15.seconds_per_step([0.0, 5.0, 6.0, 8.0, 9.0], warmup=0) == 1.5
    with pytest.raises(ValueError, match="too few"):
        gpu_sd15.seconds_per_step([0.0, 1.0], warmup=1)


def test_rows_carry_ratios_against_their_baseline_and_are_written_at_once(tmp_path):
    args = argparse.Namespace(out=str(tmp_path / "out"), work=None, peer_dir=None, budget_s=None, small=True, batch=1, threads=None)
    bench = gpu_sd15.Bench(args, gpu_sd15.SMALL)
    bench.add("personalize", "LoRA step, ours", {"seconds": 0.3, "peak_bytes": 3 * 2**30}, {"seconds": 0.4, "peak_bytes": 4 * 2**30}, "peer")
    bench.add("personalize", "DreamBooth step, ours", {"seconds": 2.0, "peak_bytes": 2**30},
              {"error": f"skipped: {bench.peer_missing('dreambooth')}"}, "peer")
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    first, second = data["rows"]
    assert first["time_ratio"] == pytest.approx(0.75) and first["memory_ratio"] == pytest.approx(0.75)
    assert "time_ratio" not in second and "no --peer-dir given" in second["baseline_error"]
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| personalize | LoRA step, ours | 0.3 | peer | 0.4 | 0.750 | 3,072 | 4,096 | 0.750 |" in table
    assert "baseline: skipped: no --peer-dir given" in table


@pytest.mark.slow
def test_small_run_end_to_end(tmp_path):
    """Every section on the small model on CPU: the personalize rows measured (the peer skipped with its reason
    where diffusers' scripts cannot run), every editor method against its raw forward, steer per baseline."""
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "dreamsteer.benchmarks.gpu_sd15", "--small", "--out", str(out), "--steps", "2", "--threads", "1"],
                          capture_output=True, text=True, timeout=3000)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())["rows"]
    by_section: dict[str, list[dict]] = {}
    for row in rows:
        by_section.setdefault(row["section"], []).append(row)
    assert not any(r.get("error") for r in rows), [r for r in rows if r.get("error")]
    ours = by_section["personalize"]
    assert [r["name"] for r in ours] == ["LoRA step, ours (fp32)", "DreamBooth step, ours (fp32)"]
    assert all(r["seconds"] > 0 and r["peak_bytes"] > 100 * 2**20 for r in ours)
    assert all("time_ratio" in r or r["baseline_error"].startswith("skipped: ") for r in ours)
    editor = {(r["name"], r["baseline"].split(" of ")[0]): r for r in by_section["editor"]}
    for method in gpu_sd15.EDITOR_METHODS:
        assert editor[(f"{method} iteration", "raw UNet forward")]["time_ratio"] > 0
    assert editor[("ground_a_score aggregated", "ground_a_score sequential (K=3)")]["time_ratio"] > 0
    lusd = [r for r in by_section["editor"] if r["name"] == "lusd iteration" and r["baseline"] == "dds iteration"]
    assert len(lusd) == 1 and lusd[0]["time_ratio"] > 0
    steer = by_section["steer"]
    assert len(steer) == 2 and all(r["seconds"] > r["baseline_seconds"] > 0 for r in steer)
    assert len(by_section["options"]) == len(gpu_sd15.SPEED_OPTIONS)
    assert "| editor | lusd iteration |" in (out / "results.md").read_text()
