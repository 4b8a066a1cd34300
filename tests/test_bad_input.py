"""Bad input ends with one or two lines naming the culprit: exit status 2, no traceback, nothing written.

The launcher runs in-process (`train.cli.main`), which is what `python -m train` calls; Hydra's own
record (`.hydra/`, `cli.log`) is the only thing it may write for a refused run.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from dreamsteer.train.cli import main


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() and ".hydra" not in p.parts and p.name != "cli.log"}


def launch(tmp_path: Path, monkeypatch, capsys, argv: list[str]) -> tuple[int, str]:
    """Run the launcher in-process from `tmp_path`; return (exit status, stderr) and check nothing was written."""
    monkeypatch.setenv("DREAMSTEER_OUTPUTS", str(tmp_path / "hydra"))
    monkeypatch.delenv("DREAMSTEER_DEBUG", raising=False)
    monkeypatch.setattr(sys, "argv", ["dreamsteer"])
    monkeypatch.chdir(tmp_path)
    before = _files(tmp_path)
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = exit_.code
    err = capsys.readouterr().err
    assert _files(tmp_path) == before, f"a refused run wrote {sorted(_files(tmp_path) - before)}"
    return status, err


def assert_refused(status: int, err: str, *culprits: str) -> None:
    assert status == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
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
    assert not (tmp_path / "out").exists()


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
