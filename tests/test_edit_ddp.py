"""Edit jobs on 2 CPU processes (Lightning DDP via the CLI in subprocesses): each job exactly once, the
same images as one process, failures recorded, and a killed run resumed without redoing finished jobs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO_ROOT

CAT = "a photo of a cat"


def _jobs(photos: Path, steps: int) -> list[dict]:
    cat, coffee = str(photos / "cat.png"), str(photos / "coffee.png")
    o = {"steps": steps}
    return [
        {"id": "dds-hat", "image": cat, "source_prompt": CAT, "target_prompt": "a photo of a cat wearing a hat", "method": "dds", "seed": 1, "overrides": o},
        {"id": "sbp-tea", "image": coffee, "source_prompt": "a cup of coffee", "target_prompt": "a cup of tea", "method": "sbp", "seed": 2, "overrides": o},
        {"id": "bad-image", "image": str(photos / "broken.png"), "source_prompt": CAT, "target_prompt": "a dog", "seed": 3, "overrides": o},
        {"id": "lusd-glasses", "image": cat, "source_prompt": CAT, "target_prompt": "a photo of a cat wearing glasses", "method": "lusd", "seed": 4, "overrides": o},
        {"id": "pds-red", "image": coffee, "source_prompt": "a cup of coffee", "target_prompt": "a red cup of coffee", "method": "pds", "seed": 5, "overrides": o},
        {"id": "cds-dog", "image": cat, "source_prompt": CAT, "target_prompt": "a photo of a dog", "method": "cds", "seed": 6, "overrides": o},
    ]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    from dreamsteer.data.samples import write_sample_images

    folder = tmp_path_factory.mktemp("photos")
    write_sample_images(folder, ["cat", "coffee"])
    # a readable header (the manifest check passes) but truncated data: the job fails at run time
    (folder / "broken.png").write_bytes((folder / "cat.png").read_bytes()[:200])
    return folder


def _cli(manifest: Path, out: Path, devices: int, wait: bool = True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}  # same threads per process -> same floats
    cmd = [sys.executable, "-m", "dreamsteer.train", "edit", f"jobs={manifest}", f"out={out}", f"trainer.devices={devices}",
           "trainer.strategy=ddp_spawn" if devices > 1 else "trainer.strategy=auto", "progress=false"]
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    # the manifest has one broken job: the run ends with status 1 and one line saying so
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "error: 1 of 6 edit jobs failed (bad-image)" in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]
    return done.stdout + done.stderr


def _edited(out: Path) -> list[str]:
    return sorted(p.stem for p in out.glob("*.png") if not p.stem.endswith(("_source", "_mask")))


def test_two_processes_each_job_once_same_images_as_one(photos, tmp_path, tiny_dir):
    """~40 s on 2 cores: in the default run (the kill/resume test below is marked slow)."""
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text("\n".join(json.dumps(j) for j in _jobs(photos, steps=3)) + "\n")
    two, one = tmp_path / "two", tmp_path / "one"
    log = _cli(manifest, two, 2)
    assert "[rank 0]" in log and "[rank 1]" in log  # progress per rank
    assert _edited(two) == ["cds-dog", "dds-hat", "lusd-glasses", "pds-red", "sbp-tea"]
    failures = [json.loads(line) for line in (two / "failures.jsonl").read_text().splitlines()]
    assert [f["id"] for f in failures] == ["bad-image"] and "broken.png" in failures[0]["error"]
    _cli(manifest, one, 1)
    assert _edited(one) == _edited(two)
    for name in _edited(one):
        a, b = np.asarray(Image.open(one / f"{name}.png")), np.asarray(Image.open(two / f"{name}.png"))
        assert np.array_equal(a, b), name


@pytest.mark.slow
def test_killed_two_process_run_resumes_without_redoing_finished_jobs(photos, tmp_path, tiny_dir):
    """Kill the run as soon as one job is finished, then re-run: only the other jobs are computed."""
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text("\n".join(json.dumps(j) for j in _jobs(photos, steps=12)) + "\n")
    resumed = tmp_path / "resumed"
    proc = _cli(manifest, resumed, 2, wait=False)
    deadline = time.time() + 600
    while not list(resumed.glob("*.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.stem: p.stat().st_mtime_ns for p in resumed.glob("*.json")}
    assert 1 <= len(finished) < 5, finished
    log = _cli(manifest, resumed, 2)
    assert f"{len(finished)} already done" in log
    assert _edited(resumed) == ["cds-dog", "dds-hat", "lusd-glasses", "pds-red", "sbp-tea"]
    assert {k: (resumed / f"{k}.json").stat().st_mtime_ns for k in finished} == finished
