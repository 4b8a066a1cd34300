"""Failure behaviour (docs/failure_behaviour.md): exports never delete what is not theirs, a killed export
or a damaged checkpoint is recovered on resume, a resume with a changed config is refused or recorded,
and one writer per output folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dreamsteer.checkpoints.adapter_io import ExportTargetError, prepare_export_target
from dreamsteer.data.samples import write_subject_set
from dreamsteer.train.config import ConfigError, compose
from dreamsteer.train.personalize import run as personalize


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def fake_adapter(folder: Path, payload: bytes = b"weights") -> Path:
    """A minimal folder in the shape `export_adapter` writes (adapter.json listing its files)."""
    folder.mkdir(parents=True)
    (folder / "w.safetensors").write_bytes(payload)
    (folder / "adapter.json").write_text(json.dumps({"format_version": 1, "method": "lora", "files": {"w.safetensors": "x"}}))
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-step LoRA run (a checkpoint per step) and the overrides that made it."""
    root = tmp_path_factory.mktemp("personalize")
    write_subject_set(root / "subject", "cat", count=2)
    overrides = ["method=lora", f"data.instance_dir={root / 'subject'}", "data.instance_prompt='a photo of sks cat'",
                 "trainer.max_steps=2", "trainer.checkpoint_every_n_steps=1", "logger=none", f"output_dir={root / 'run'}"]
    personalize(compose("personalize", overrides))
    return root, overrides


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- data loss
def test_export_refuses_targets_that_are_not_its_own_and_leaves_them_intact(trained, tmp_path):
    from dreamsteer.train.export import run as export

    root, overrides = trained
    victim = tmp_path / "photos"
    victim.mkdir()
    (victim / "holiday.jpg").write_bytes(b"jpeg")
    (victim / "notes.txt").write_text("keep me")
    run_before = snapshot(root / "run")
    for target, why in ((victim, "not one of our adapter exports"), (root / "run", "is or contains the checkpoint"),
                        (root / "run" / "checkpoints", "is or contains the checkpoint"), (root, "is or contains the checkpoint"),
                        (root / "subject", "is or contains the subject photos"), (victim / "notes.txt", "is a file")):
        with pytest.raises(ExportTargetError, match=why):
            export(compose("export", [f"ckpt={root / 'run'}", f"dir={target}"]))
    assert snapshot(victim) == {"holiday.jpg": b"jpeg", "notes.txt": b"keep me"}
    assert {k: v for k, v in snapshot(root / "run").items() if k != ".dreamsteer.lock"} == \
           {k: v for k, v in run_before.items() if k != ".dreamsteer.lock"}
    # our own adapter folder is replaced, with the checkpoint's step
    path = export(compose("export", [f"ckpt={root / 'run'}", f"dir={root / 'run' / 'adapter'}"]))
    assert json.loads((path / "adapter.json").read_text())["training_steps"] == 2

    # personalize refuses a file as export.dir before any training; steer refuses a path as export_name
    with pytest.raises(ExportTargetError, match="is a file"):
        personalize(compose("personalize", [*overrides[:-1], f"output_dir={tmp_path / 'p'}", f"export.dir={victim / 'notes.txt'}"]))
    assert not (tmp_path / "p" / "checkpoints").exists()
    from dreamsteer.train.steer import run as steer

    for name in ("../x", "a/b", ".."):
        with pytest.raises(ConfigError, match="export_name"):
            steer(compose("steer", [f"adapter={path}", f"image={victim / 'holiday.jpg'}", "source_prompt='a cat'",
                                    "ref_prompt='a sks cat'", f"output_dir={tmp_path / 's'}", f"export_name='{name}'"]))
    assert (victim / "notes.txt").read_text() == "keep me"


def test_a_kill_between_the_renames_of_a_re_export_is_recovered(tmp_path):
    """The fallback swap moves the old adapter aside first; a kill there leaves no adapter: the next start puts it back."""
    target = tmp_path / "adapter"
    dead = dead_pid()
    moved = fake_adapter(tmp_path / f".adapter.old.{dead}.abc", b"old")
    fake_adapter(tmp_path / f".adapter.tmp.{dead}.def", b"half")
    live = fake_adapter(tmp_path / f".adapter.tmp.{os.getpid()}.ghi", b"another exporter")  # a live writer's: not ours
    prepare_export_target(target)
    assert (target / "w.safetensors").read_bytes() == b"old" and not moved.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["adapter", live.name])


def test_re_export_swaps_atomically(tiny_dir, tmp_path):
    from dreamsteer.checkpoints import export_adapter
    from dreamsteer.diffusion.adapters import attach_adapter
    from dreamsteer.diffusion.backbone import load_backbone

    bb = load_backbone(str(tiny_dir))
    attach_adapter(bb, "textual_inversion", tokens=["<t>"], initializer_token="cat")
    first = export_adapter(bb, tmp_path / "adapter")
    inode = (first / "adapter.json").stat().st_ino
    export_adapter(bb, tmp_path / "adapter")
    assert (first / "adapter.json").stat().st_ino != inode  # replaced ...
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # ... and nothing left beside it


# ----------------------------------------------------------------------------- crashes and resume
def test_killed_export_is_redone_and_damaged_checkpoints_fall_back_on_resume(trained, tmp_path, capsys):
    from safetensors.torch import load_file

    root, overrides = trained
    run = root / "run"
    weights = load_file(str(run / "adapter" / "pytorch_lora_weights.safetensors"))
    import shutil

    shutil.rmtree(run / "adapter")  # as if killed during the final export
    dead = dead_pid()
    (run / "checkpoints" / f"last.ckpt.{dead}.abc.tmp").write_bytes(b"partial")
    personalize(compose("personalize", [*overrides, "ckpt_path=last"]))  # at max_steps: Lightning skips the loop
    redone = load_file(str(run / "adapter" / "pytorch_lora_weights.safetensors"))
    assert redone.keys() == weights.keys() and all(torch.equal(redone[k], weights[k]) for k in weights)
    assert not list((run / "checkpoints").glob("*.tmp"))

    # a corrupt last.ckpt: resume from the newest readable step checkpoint, say so, record the changed lr
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    capsys.readouterr()
    more = [o.replace("max_steps=2", "max_steps=3") for o in overrides]
    adapter = personalize(compose("personalize", [*more, "ckpt_path=last", "method.lr=2e-4"]))
    said = capsys.readouterr().out
    assert "last.ckpt: cannot be read (empty file)" in said and "resuming from" in said and "step000002.ckpt" in said
    manifest = json.loads((adapter / "adapter.json").read_text())
    assert manifest["training_steps"] == 3
    assert manifest["training"]["resumes"][-1] == {"step": 2, "checkpoint": "step000002.ckpt",
                                                   "changed": {"method.lr": [1e-4, 2e-4], "trainer.max_steps": [2, 3]}}
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3 and last["lr_schedulers"][0]["base_lrs"] == [2e-4]  # the new lr took effect

    # a change that cannot work is refused in one line naming the key and both values
    with pytest.raises(ConfigError, match=r"'method.rank'.* 4, .* 8"):
        personalize(compose("personalize", [*more, "ckpt_path=last", "method.rank=8"]))


def test_killed_before_the_first_last_ckpt_resumes_from_a_step_checkpoint(trained, tmp_path):
    from dreamsteer.checkpoints.lightning import CheckpointError, find_resume_checkpoint

    root, _ = trained
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    step = next((root / "run" / "checkpoints").glob("step*.ckpt"))
    (folder / "step000001.ckpt").write_bytes(step.read_bytes())
    (folder / "step000001-v1.ckpt").write_bytes(step.read_bytes())  # an orphan duplicate of a resumed run
    path, checkpoint = find_resume_checkpoint(folder)
    assert path == folder / "step000001.ckpt" and sorted(p.name for p in folder.iterdir()) == ["step000001.ckpt"]
    (folder / "step000001.ckpt").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(CheckpointError, match="no checkpoint can be read"):
        find_resume_checkpoint(folder)


# ----------------------------------------------------------------------------- concurrency
HOLD_LOCK = """
import json, socket, sys, time
from dreamsteer.train.lock import output_lock
with output_lock(sys.argv[1], "personalize"):
    if len(sys.argv) > 2:  # pretend the recorded holder is a process that died (a child kept the file open)
        open(sys.argv[1] + "/.dreamsteer.lock", "w").write(json.dumps({"task": "x", "pid": int(sys.argv[2]), "host": socket.gethostname()}))
    print("locked", flush=True)
    time.sleep(60)
"""


def hold_lock(folder: Path, *fake_pid: int) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(folder), *map(str, fake_pid)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_second_writer_on_an_output_folder_is_refused_naming_the_holder(trained, tmp_path):
    from dreamsteer.lit_modules.edit import remove_partial_writes
    from dreamsteer.train.lock import OutputFolderLocked

    root, overrides = trained
    out = tmp_path / "busy"
    holder = hold_lock(out)
    try:
        theirs = out / f"x.png.{holder.pid}.abc.tmp"  # a temp file the live run is writing
        theirs.write_bytes(b"")
        with pytest.raises(OutputFolderLocked, match=rf"in use by personalize \(pid {holder.pid} on .*started"):
            personalize(compose("personalize", [*overrides[:-1], f"output_dir={out}"]))
        assert not (out / "checkpoints").exists()
        remove_partial_writes(out)
        assert theirs.exists()  # only temp files of dead writers are cleaned
    finally:
        holder.kill()
        holder.wait()
    remove_partial_writes(out)
    assert not theirs.exists()


def test_stale_lock_of_a_dead_holder_is_taken_over(tmp_path, capsys):
    from dreamsteer.train.lock import output_lock

    dead = dead_pid()
    holder = hold_lock(tmp_path, dead)  # the flock is still held, by a process that is not the recorded one
    try:
        with output_lock(tmp_path, "sample"):
            record = json.loads((tmp_path / ".dreamsteer.lock").read_text())
            assert record["pid"] == os.getpid() and record["task"] == "sample"
        assert f"took over the stale lock of {tmp_path}: its holder x (pid {dead}" in capsys.readouterr().out
    finally:
        holder.kill()
        holder.wait()


RUN_FOLDER = """
import sys
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from dreamsteer.train.config import CONF_DIR
from hydra.core.utils import *  # registers the `now` resolver
with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
    cfg = compose(config_name="sample", overrides=sys.argv[1:], return_hydra_config=True)
print(OmegaConf.select(cfg, "hydra.run.dir"))
"""


def test_default_run_folders_differ_for_runs_started_in_the_same_second_and_output_dir_is_the_run_folder(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", RUN_FOLDER], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    folders = [p.communicate()[0].strip() for p in procs]
    assert folders[0] != folders[1] and all(f.startswith("outputs/sample/") for f in folders)
    given = subprocess.run([sys.executable, "-c", RUN_FOLDER, f"output_dir={tmp_path / 'mine'}"], capture_output=True, text=True)
    assert given.stdout.strip() == str(tmp_path / "mine")  # Hydra's .hydra/ record lands in output_dir


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` and that run multiprocessing's spawn entry point (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"spawn_main" in cmdline:
            found.append(int(stat.parent.name))
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_ddp_spawn_workers_stop_when_the_main_process_is_killed(tmp_path):
    import signal
    import time

    from dreamsteer.data.samples import write_sample_images

    write_sample_images(tmp_path, ["cat"])
    jobs = [{"id": f"j{i}", "image": str(tmp_path / "cat.png"), "source_prompt": "a cat", "target_prompt": "a dog",
             "method": "sds", "seed": i, "overrides": {"steps": 5000}} for i in range(4)]
    (tmp_path / "jobs.jsonl").write_text("\n".join(json.dumps(j) for j in jobs) + "\n")
    main = subprocess.Popen([sys.executable, "-m", "dreamsteer.train", "edit", f"jobs={tmp_path / 'jobs.jsonl'}", f"out={tmp_path / 'out'}",
                             "editor=sds", "trainer.devices=2", "trainer.strategy=ddp_spawn", "progress=false"],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.time() + 300
        while len(workers) < 2 and time.time() < deadline and main.poll() is None:
            time.sleep(0.5)
            workers = _children(main.pid)
        assert len(workers) == 2, "the ddp_spawn workers did not start"
        time.sleep(3)  # let them reach setup
        main.send_signal(signal.SIGKILL)
        main.wait()
        deadline = time.time() + 60
        while any(_running(w) for w in workers) and time.time() < deadline:
            time.sleep(0.5)
        assert not any(_running(w) for w in workers)
    finally:
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ----------------------------------------------------------------------------- housekeeping
def test_progress_false_silences_every_bar(trained, tmp_path, capfd):
    """Model loading (diffusers / transformers), class images, Lightning's bar: nothing draws a bar."""
    root, overrides = trained
    capfd.readouterr()
    adapter = personalize(compose("personalize", [
        *overrides[:-1], f"output_dir={tmp_path / 'p'}", "loss.prior_preservation=true", "data.class_prompt='a photo of a cat'",
        "data.num_class_images=1", "data.class_steps=1", "trainer.max_steps=1", "progress=false"]))
    printed = "".join(capfd.readouterr())
    assert (tmp_path / "p" / "class_images").is_dir() and (adapter / "adapter.json").is_file()
    assert not any(bar in printed for bar in ("it/s]", "%|", "━")), printed[-2000:]
