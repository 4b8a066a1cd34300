"""CPU threads and OpenMP's wait policy for the toy model's tasks, alone and beside a second job.

    python -m benchmarks.cpu_threads                       # personalize + edit, every setting, 3 repeats
    python -m benchmarks.cpu_threads --tasks edit --repeats 1

Each setting runs the `train` CLI as a user does, in fresh processes whose environment sets it:

- ``default``: torch's default, one thread per core, idle OpenMP threads spinning a while before they
  sleep (libgomp's default wait policy): the baseline every ratio is against;
- ``passive``: the same threads with ``OMP_WAIT_POLICY=PASSIVE`` (idle threads sleep at once), which
  the CLI forced until 2026-12-02;
- ``1 thread``: ``OMP_NUM_THREADS=1``, what the demo's ``threads: 1`` sets.

Each is measured alone and as two identical jobs started together (``x2``: a user running two jobs,
or a shared machine). A task's steps per second exclude start-up: the wall time of a run of
``--steps`` steps minus that of a run of ``--steps / 10``, started the same way, over the steps between.
Tasks: ``personalize`` (the toy LoRA recipe, ``experiment=toy_lora``, on 5 rendered subject photos)
and ``edit`` (DDS with the toy recipe, ``experiment=toy_dds``, a color edit of a rendered scene).
Medians over ``--repeats`` rounds, settings interleaved within a round so that all see the same
machine; the first round's runs also warm the file cache.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {
    "default": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "1 thread": {"OMP_NUM_THREADS": "1"},
}
DEFAULT_STEPS = {"personalize": 200, "edit": 100}


def task_args(task: str, steps: int, work: Path, out: Path) -> list[str]:
    if task == "personalize":
        return ["personalize", "model=toy", "method=lora", "experiment=toy_lora", f"data.instance_dir={work / 'subject'}",
                "data.instance_prompt=a sks circle", f"trainer.max_steps={steps}", "logger=none", "progress=false", f"output_dir={out}"]
    return ["edit", "model=toy", "editor=dds", "experiment=toy_dds", f"editor.steps={steps}", f"image={work / 'scene.png'}",
            "source_prompt=a red circle and a green square on a white background",
            "target_prompt=a blue circle and a green square on a white background", "id=scene", "progress=false", f"output_dir={out}"]


def clean_env(setting: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    return {**env, **SETTINGS[setting], "TRANSFORMERS_VERBOSITY": "error"}


def timed_runs(task: str, steps: int, setting: str, copies: int, work: Path) -> list[float]:
    """Wall seconds of `copies` identical runs started together."""
    procs = []
    for i in range(copies):
        out = Path(tempfile.mkdtemp(dir=work, prefix="run-"))
        cmd = [sys.executable, "-m", "dreamsteer.train", *task_args(task, steps, work, out)]
        procs.append((time.perf_counter(), subprocess.Popen(cmd, env=clean_env(setting), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
    seconds = []
    for start, proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"{task} ({setting}) failed:\n{err.decode()[-2000:]}")
        seconds.append(time.perf_counter() - start)
    return seconds


def steps_per_second(task: str, steps: int, setting: str, copies: int, work: Path) -> float:
    short = max(1, steps // 10)
    long_runs = timed_runs(task, steps, setting, copies, work)
    short_runs = timed_runs(task, short, setting, copies, work)
    return (steps - short) / (statistics.median(long_runs) - statistics.median(short_runs))


def make_inputs(work: Path) -> None:
    from dreamsteer.data.scenes import SceneObject, render, write_subject_photos

    write_subject_photos(work / "subject", 5, seed=0)
    scene = render("white", [SceneObject("circle", "red", (0.27, 0.5), 0.2), SceneObject("square", "green", (0.73, 0.5), 0.2)])
    scene.image.save(work / "scene.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=list(DEFAULT_STEPS), default=list(DEFAULT_STEPS))
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="steps of the long run (default: personalize 200, edit 100)")
    args = parser.parse_args()
    if args.repeats < 1 or (args.steps is not None and args.steps < 10):
        parser.error("--repeats must be >= 1 and --steps >= 10")
    if "default" not in args.settings:
        args.settings.insert(0, "default")  # the baseline of every ratio
    print(f"{os.cpu_count()} CPUs; torch's default: one thread per core; medians of {args.repeats} round(s)")
    with tempfile.TemporaryDirectory(prefix="cpu-threads-") as tmp:
        work = Path(tmp)
        make_inputs(work)
        rates: dict[tuple[str, str, int], list[float]] = {}
        for _ in range(args.repeats):
            for task in args.tasks:
                steps = args.steps or DEFAULT_STEPS[task]
                for copies in (1, 2):
                    for setting in args.settings:
                        rates.setdefault((task, setting, copies), []).append(steps_per_second(task, steps, setting, copies, work))
    print("\n| task | setting | steps/s alone | vs default | steps/s each, x2 | vs default x2 |")
    print("|---|---|---|---|---|---|")
    for task in args.tasks:
        base = {c: statistics.median(rates[(task, "default", c)]) for c in (1, 2)}
        for setting in args.settings:
            alone, two = (statistics.median(rates[(task, setting, c)]) for c in (1, 2))
            print(f"| {task} | {setting} | {alone:.2f} | {alone / base[1]:.2f}x | {two:.2f} | {two / base[2]:.2f}x |")


if __name__ == "__main__":
    main()
