"""Bad input ends with one or two lines naming the culprit: exit status 2, no traceback, nothing written.

The launcher runs in-process (`train.cli.main`), which is what `python -m train` calls; Hydra's own
record (`.hydra/`, `cli.log`) is the only thing it may write for a refused run.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

from dreamsteer.train.cli import main


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() and ".hydra" not in p.parts and p.name != "cli.log"}


def _run(tmp_path: Path, monkeypatch, capsys, argv: list[str]) -> tuple[int, str]:
    """Run the launcher in-process from `tmp_path`; return (exit status, stderr)."""
    monkeypatch.setenv("DREAMSTEER_OUTPUTS", str(tmp_path / "hydra"))
    monkeypatch.delenv("DREAMSTEER_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["dreamsteer"])
    monkeypatch.chdir(tmp_path)
    # Lightning gives its loggers a stream handler on the stderr of the moment it is first imported, which
    # may be an earlier test's (closed) capture: point them at this test's stderr
    for name, logger in list(logging.root.manager.loggerDict.items()):
        for handler in getattr(logger, "handlers", []) if name.startswith("lightning") else []:
            if type(handler) is logging.StreamHandler:
                monkeypatch.setattr(handler, "stream", sys.stderr)
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = exit_.code
    return status, capsys.readouterr().err


def launch(tmp_path: Path, monkeypatch, capsys, argv: list[str]) -> tuple[int, str]:
    """`_run`, checking that nothing was written."""
    before = _files(tmp_path)
    status, err = _run(tmp_path, monkeypatch, capsys, argv)
    assert _files(tmp_path) == before, f"a refused run wrote {sorted(_files(tmp_path) - before)}"
    return status, err


def assert_refused(status: int, err: str, *culprits: str) -> None:
    assert status == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip() and "it/s]" not in line]  # progress bars aside
    assert 1 <= len(lines) <= 2, err
    for culprit in culprits:
        assert culprit in err, err


@pytest.fixture
def no_gpu(monkeypatch):
    """The same answers on a GPU machine: no CUDA device is visible."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


# ----------------------------------------------------------------------------- config values
@pytest.mark.parametrize("argv, culprits", [
    (["sample", "output_dir=afile"], ["'output_dir'", "afile is a file"]),
    (["edit", "out=afile", "jobs=j.jsonl"], ["'out'", "afile is a file"]),
    (["edit", "output_dir=afile/sub", "image=x.png", "target_prompt=t"], ["'output_dir'", "under", "afile"]),
    (["sample", "model.device=cuda", "output_dir=out"], ["'model.device'", "no CUDA device"]),
    (["sample", "model.device=cuda:1", "output_dir=out"], ["'model.device'", "no CUDA device"]),
    (["generate", "model.device=bogus", "output_dir=out"], ["'model.device'", "'bogus' is not a device"]),
    (["evaluate", "device=tpu:0", "run=x", "output_dir=out"], ["'device'", "is not a device"]),
    (["personalize", "trainer.devices=0", "output_dir=out", "data.instance_dir=photos", "data.instance_prompt=p"], ["'trainer.devices'", "0"]),
    (["personalize", "trainer.devices=abc", "output_dir=out", "data.instance_dir=photos", "data.instance_prompt=p"], ["'trainer.devices'", "'abc'"]),
    (["edit", "trainer.devices=[0,0]", "output_dir=out", "jobs=j.jsonl"], ["'trainer.devices'"]),
    (["edit", "trainer.accelerator=gpu", "output_dir=out", "jobs=j.jsonl"], ["'trainer.accelerator'", "no CUDA device"]),
    (["edit", "editor.lr=1e300", "output_dir=out", "image=x.png", "target_prompt=t"], ["'editor.lr'", "1e+300"]),
    (["edit", "editor.guidance=inf", "output_dir=out", "image=x.png", "target_prompt=t"], ["'editor.guidance'", "inf"]),
    (["sample", "guidance_scale=nan", "output_dir=out"], ["'guidance_scale'", "nan"]),
    (["sample", "seed=100000000000000000000000", "output_dir=out"], ["'seed'", "64 bits"]),
    (["personalize", "method.lr=5", "output_dir=out", "data.instance_dir=photos", "data.instance_prompt=p"], ["'method.lr'", "(0, 1]"]),
])
def test_bad_config_values_are_refused_before_loading(tmp_path, monkeypatch, capsys, no_gpu, argv, culprits):
    (tmp_path / "afile").write_text("not a folder")
    status, err = launch(tmp_path, monkeypatch, capsys, argv)
    assert_refused(status, err, *culprits)
    assert not _files(tmp_path / "out")  # at most Hydra's record: output_dir is the Hydra run folder


def test_unwritable_output_dir_is_refused(tmp_path, monkeypatch, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.access(locked, os.W_OK):  # root ignores permission bits: deny what a user would be denied
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    try:
        status, err = launch(tmp_path, monkeypatch, capsys, ["sample", f"output_dir={locked / 'run'}"])
    finally:
        locked.chmod(0o755)
    assert_refused(status, err, "'output_dir'", str(locked), "cannot write")


# ----------------------------------------------------------------------------- images and manifests
def write_bomb(path: Path, side: int = 20000) -> Path:
    """A tiny PNG whose header claims `side` x `side` pixels (PIL refuses it as a decompression bomb)."""
    import io
    import struct
    import zlib

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 30, 30)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", side, side)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


@pytest.fixture
def inputs(tmp_path) -> Path:
    from PIL import Image

    folder = tmp_path / "in"
    (folder / "photos").mkdir(parents=True)
    Image.new("RGB", (64, 64), (200, 100, 50)).save(folder / "cat.png")
    Image.new("RGB", (64, 64), (20, 100, 50)).save(folder / "photos" / "a.png")
    write_bomb(folder / "photos" / "b.png")
    write_bomb(folder / "bomb.png")
    (folder / "subject").mkdir()
    Image.new("RGB", (64, 64), (20, 100, 50)).save(folder / "subject" / "a.png")
    jobs = {
        "seed": {"id": "j", "image": "cat.png", "source_prompt": "a cat", "target_prompt": "a dog", "seed": 2**70},
        "missing": {"id": "j", "image": "nope.png", "source_prompt": "a cat", "target_prompt": "a dog"},
        "folder": {"id": "j", "image": "photos", "source_prompt": "a cat", "target_prompt": "a dog"},
        "bomb": {"id": "j", "image": "bomb.png", "source_prompt": "a cat", "target_prompt": "a dog"},
    }
    import json

    for name, job in jobs.items():
        (folder / f"{name}.jsonl").write_text("# one job\n" + json.dumps(job) + "\n")
    (folder / "binary.jsonl").write_bytes(b"# jobs\n" + bytes(range(128, 256)) + b"\n")
    return folder


EDIT = ["edit", "output_dir=out", "source_prompt=a cat", "target_prompt=a dog", "editor.steps=1"]


@pytest.mark.parametrize("argv, culprits", [
    (EDIT + ["image=in/bomb.png"], ["bomb.png", "400,000,000 pixels", "178,956,970"]),
    (EDIT + ["image=in/photos"], ["in/photos", "is a folder"]),
    (EDIT + ["editor=ground_a_score", "image=in/cat.png", "subtasks=[{source: cat, target: dog, mask: in/bomb.png}]"],
     ["subtasks[0].mask", "bomb.png", "178,956,970"]),
    (["personalize", "output_dir=out", "data.instance_dir=in/photos", "data.instance_prompt=a photo of sks cat"], ["b.png", "178,956,970"]),
    (["edit", "output_dir=out", "jobs=in/seed.jsonl"], ["seed.jsonl line 2", "'seed'", str(2**70)]),
    (["edit", "output_dir=out", "jobs=in/binary.jsonl"], ["binary.jsonl line 2", "not UTF-8"]),
    (["edit", "output_dir=out", "jobs=in/missing.jsonl"], ["missing.jsonl line 2", "'image'", "nope.png: file not found"]),
    (["edit", "output_dir=out", "jobs=in/folder.jsonl"], ["folder.jsonl line 2", "'image'", "is a folder"]),
    (["edit", "output_dir=out", "jobs=in/bomb.jsonl"], ["bomb.jsonl line 2", "'image'", "178,956,970"]),
])
def test_bad_images_and_manifests_are_refused_before_loading(tmp_path, monkeypatch, capsys, inputs, argv, culprits):
    status, err = launch(tmp_path, monkeypatch, capsys, argv)
    assert_refused(status, err, *culprits)
    assert not _files(tmp_path / "out")  # at most Hydra's record: output_dir is the Hydra run folder


# ----------------------------------------------------------------------------- adapter folders
@pytest.fixture(scope="module")
def lora_export(tmp_path_factory, tiny_dir) -> Path:
    from dreamsteer.checkpoints import export_adapter
    from dreamsteer.diffusion.adapters import add_lora
    from dreamsteer.diffusion.backbone import load_backbone

    backbone = load_backbone("tiny")
    add_lora(backbone, rank=4)
    return export_adapter(backbone, tmp_path_factory.mktemp("adapters") / "lora")


def _edit_manifest(folder: Path, change) -> None:
    import json

    manifest = json.loads((folder / "adapter.json").read_text())
    change(manifest)
    (folder / "adapter.json").write_text(json.dumps(manifest))


def _rehash(folder: Path) -> None:
    """Update the sha256 of every listed file, as someone who edits the weights on purpose would."""
    from dreamsteer.checkpoints.adapter_io import sha256_file

    def change(manifest):
        manifest["files"] = {name: sha256_file(folder / name) for name in manifest["files"] if (folder / name).is_file()}

    _edit_manifest(folder, change)


def _set_weights(folder: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "pytorch_lora_weights.safetensors"
    state = load_file(path)
    change(state)
    save_file(state, path)


def _tamper(folder: Path, case: str, outside: Path) -> None:
    import torch

    weights = folder / "pytorch_lora_weights.safetensors"
    if case == "method edited":
        _edit_manifest(folder, lambda m: m.update(method="textual_inversion"))
    elif case == "config edited":
        _edit_manifest(folder, lambda m: m["adapter_config"].update(rank=8))
    elif case == "wrong shapes":
        _set_weights(folder, lambda s: s.update({k: torch.zeros(v.shape[0], v.shape[1] + 1) for k, v in list(s.items())[:1]}))
        _rehash(folder)
    elif case == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        _rehash(folder)
    elif case == "garbage":
        weights.write_bytes(os.urandom(4096))
        _rehash(folder)
    elif case == "nan":
        _set_weights(folder, lambda s: s.update({k: torch.full_like(v, float("nan")) for k, v in list(s.items())[:1]}))
        _rehash(folder)
    elif case == "absolute path":
        _edit_manifest(folder, lambda m: m["files"].update({str(outside): "0" * 64}))
    elif case == "dot-dot path":
        _edit_manifest(folder, lambda m: m["files"].update({"../outside.txt": "0" * 64}))
    elif case == "symlink out":
        (folder / "notes.txt").symlink_to(outside)
        _edit_manifest(folder, lambda m: m["files"].update({"notes.txt": "0" * 64}))


@pytest.mark.parametrize("case, culprits", [
    ("method edited", ["adapter.json", "'textual_inversion'", "edited"]),
    ("config edited", ["pytorch_lora_weights.safetensors", "rank 8"]),
    ("wrong shapes", ["pytorch_lora_weights.safetensors", "has shape"]),
    ("truncated", ["pytorch_lora_weights.safetensors", "not a readable safetensors file"]),
    ("garbage", ["pytorch_lora_weights.safetensors", "not a readable safetensors file"]),
    ("nan", ["pytorch_lora_weights.safetensors", "NaN"]),
    ("absolute path", ["refusing file", "outside.txt"]),
    ("dot-dot path", ["refusing file", "../outside.txt"]),
    ("symlink out", ["refusing file", "notes.txt", "outside the folder"]),
])
def test_tampered_adapter_is_refused(tmp_path, monkeypatch, capsys, lora_export, case, culprits):
    import shutil

    folder = tmp_path / "lora"
    shutil.copytree(lora_export, folder)
    outside = tmp_path / "outside.txt"
    outside.write_text("not part of the adapter")
    _tamper(folder, case, outside)
    status, err = launch(tmp_path, monkeypatch, capsys, ["sample", f"adapter={folder}", "steps=1", "num_images=1", "output_dir=out"])
    assert_refused(status, err, *culprits)
    assert not _files(tmp_path / "out")  # at most Hydra's record: output_dir is the Hydra run folder


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("task", ["personalize", "export"])
@pytest.mark.parametrize("kind, culprits", [
    ("pickle", ["plain.ckpt", "not a torch checkpoint archive", "weights_only=True"]),
    ("code", ["code.ckpt", "posix.system", "weights_only=True"]),
])
def test_pickled_checkpoint_is_refused(tmp_path, monkeypatch, capsys, inputs, task, kind, culprits):
    import pickle

    import torch

    if kind == "pickle":
        (inputs / "plain.ckpt").write_bytes(pickle.dumps({"state_dict": {}, "note": "a plain pickle"}))
    else:  # a zip checkpoint whose pickle names a function: loading it unsafely would call os.system
        torch.save({"state_dict": {}, "hook": os.system}, inputs / "code.ckpt")
    ckpt = inputs / culprits[0]
    argv = (["personalize", "output_dir=out", "data.instance_dir=in/subject", "data.instance_prompt=a photo of sks cat",
             f"ckpt_path={ckpt}"] if task == "personalize" else ["export", f"ckpt={ckpt}", "output_dir=out"])
    status, err = launch(tmp_path, monkeypatch, capsys, argv)
    assert_refused(status, err, *culprits)
    assert not _files(tmp_path / "out")  # at most Hydra's record: output_dir is the Hydra run folder


# ----------------------------------------------------------------------------- disk full
@pytest.fixture
def disk_full(monkeypatch):
    """``disk_full(match)``: from then on, flushing a file whose name contains `match` fails with ENOSPC
    (every writer of ours fsyncs each file before renaming it into place)."""
    import errno

    real_fsync = os.fsync

    def start(match: str) -> None:
        def fsync(fd: int) -> None:
            name = os.readlink(f"/proc/self/fd/{fd}")
            if match in Path(name).name:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc/self/fd to tell which file is flushed")
    return start


def _snapshot(folder: Path) -> dict[str, bytes]:
    """The outputs in `folder` (not the run's bookkeeping: Hydra's record, the log, the lock's holder record)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(_files(folder)) if p.name != ".dreamsteer.lock"}


def assert_disk_full(status: int, err: str, path: Path) -> None:
    assert status == 2 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: no space left on {path}"], err


def test_disk_full_during_checkpoint_and_export_keeps_earlier_outputs(tmp_path, monkeypatch, capsys, inputs, disk_full):
    import torch

    run = tmp_path / "run"
    disk_full("step000002")
    status, err = _run(tmp_path, monkeypatch, capsys, [
        "personalize", "method=lora", f"output_dir={run}", "data.instance_dir=in/subject", "data.instance_prompt=a photo of sks cat",
        "trainer.max_steps=2", "trainer.checkpoint_every_n_steps=1", "logger=none"])
    assert_disk_full(status, err, run / "checkpoints" / "step000002.ckpt")
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step000001.ckpt"], names  # no temp file left behind
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1
    monkeypatch.undo()

    exported = tmp_path / "exported"
    status, err = _run(tmp_path, monkeypatch, capsys, ["export", f"ckpt={run}", f"dir={exported}"])
    assert status == 0, err
    before = _snapshot(tmp_path / "exported")
    disk_full("")  # every file
    status, err = _run(tmp_path, monkeypatch, capsys, ["export", f"ckpt={run}", f"dir={exported}"])
    assert_disk_full(status, err, exported)
    assert _snapshot(exported) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".exported")) == []


def test_disk_full_during_an_edit_keeps_the_earlier_edit(tmp_path, monkeypatch, capsys, inputs, disk_full):
    out = tmp_path / "out"
    edit = ["edit", f"output_dir={out}", "image=in/cat.png", "source_prompt=a cat", "editor.steps=1", "progress=false"]
    status, err = _run(tmp_path, monkeypatch, capsys, [*edit, "target_prompt=a dog"])
    assert status == 0, err
    before = _snapshot(out)
    disk_full("edit.png")
    status, err = _run(tmp_path, monkeypatch, capsys, [*edit, "target_prompt=a red dog"])
    assert_disk_full(status, err, out / "edit.png")
    assert _snapshot(out) == before


def test_edit_with_a_failed_job_exits_non_zero(tmp_path, monkeypatch, capsys, inputs):
    import json

    (inputs / "cut.png").write_bytes((inputs / "cat.png").read_bytes()[:60])  # a readable header, truncated data
    jobs = [{"id": "ok", "image": "cat.png", "source_prompt": "a cat", "target_prompt": "a dog", "overrides": {"steps": 1}},
            {"id": "cut", "image": "cut.png", "source_prompt": "a cat", "target_prompt": "a dog", "overrides": {"steps": 1}}]
    (inputs / "jobs.jsonl").write_text("".join(json.dumps(job) + "\n" for job in jobs))
    status, err = _run(tmp_path, monkeypatch, capsys, ["edit", "jobs=in/jobs.jsonl", "out=out", "progress=false"])
    assert status == 1 and "Traceback" not in err, err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: 1 of 2 edit jobs failed (cut); the reasons are in out/failures.jsonl, a re-run retries only those"]
    assert (tmp_path / "out" / "ok.png").is_file() and (tmp_path / "out" / "failures.jsonl").is_file()


# ----------------------------------------------------------------------------- long prompts
def _long_prompt(task: str) -> str:
    return f"a {task} photo of a cat " + " ".join(["with a small red hat"] * 20)  # about 110 CLIP tokens


@pytest.mark.parametrize("task, argv", [
    ("sample", ["sample", "steps=1", "num_images=1", "output_dir=out", "prompt={prompt}"]),
    ("edit", ["edit", "image=in/cat.png", "source_prompt=a cat", "target_prompt={prompt}", "editor.steps=1", "progress=false", "output_dir=out"]),
    ("personalize", ["personalize", "data.instance_dir=in/subject", "data.instance_prompt={prompt}", "trainer.max_steps=1", "logger=none",
                     "output_dir=out"]),
    ("generate", ["generate", "steps=1", "phrases=['{prompt}','a dog']", "output_dir=out"]),  # a GLIGEN phrase
])
def test_long_prompts_are_warned_about_in_every_task(tmp_path, monkeypatch, capsys, inputs, task, argv):
    from dreamsteer.diffusion.backbone import PromptTruncatedWarning

    prompt = _long_prompt(task)
    with pytest.warns(PromptTruncatedWarning, match=r"is 1\d\d tokens long; the text encoder reads only the first 77") as caught:
        status, err = _run(tmp_path, monkeypatch, capsys, [a.replace("{prompt}", prompt) for a in argv])
    assert status == 0, err
    named = [w for w in caught if w.category is PromptTruncatedWarning]
    assert len(named) == 1 and repr(prompt) in str(named[0].message)  # once, however often it is encoded


def test_prompts_within_the_limit_are_not_warned_about(tiny_backbone, recwarn):
    from dreamsteer.diffusion.backbone import PromptTruncatedWarning

    fits = " ".join(["cat"] * 75)  # 75 words + start and end tokens = 77
    tiny_backbone.tokenize([fits, "a photo of a dog"])
    assert not [w for w in recwarn if w.category is PromptTruncatedWarning]
    with pytest.warns(PromptTruncatedWarning, match="78 tokens"):
        tiny_backbone.tokenize([fits + " cat"])
