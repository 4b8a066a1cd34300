"""The launcher: help, unknown task, bad overrides, and `sample` end to end."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys

from tests.conftest import REPO_ROOT
from dreamsteer.train.cli import override_error
from dreamsteer.train.config import compose
from dreamsteer.train.tasks import TASKS


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, DREAMSTEER_OUTPUTS=str(cwd or REPO_ROOT / "outputs"))
    return subprocess.run([sys.executable, "-m", "dreamsteer.train", *args], cwd=cwd or REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_help_lists_every_task():
    result = _cli("--help")
    assert result.returncode == 0
    for name, (_, description) in TASKS.items():
        assert name in result.stdout and description in result.stdout


def test_unknown_task_is_a_short_error():
    result = _cli("smaple")
    assert result.returncode == 2
    assert "unknown task 'smaple'" in result.stderr and "Did you mean 'sample'" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_override_names_the_key(tmp_path):
    unknown = _cli("sample", "no_such_key=1", cwd=tmp_path)
    assert unknown.returncode != 0 and "no_such_key" in unknown.stderr and "Traceback" not in unknown.stderr
    wrong_type = _cli("sample", "steps=many", cwd=tmp_path)
    assert wrong_type.returncode == 2 and "config key 'steps'" in wrong_type.stderr
    bad_choice = _cli("sample", "model.dtype=fp8", cwd=tmp_path)
    assert bad_choice.returncode == 2 and "config key 'model.dtype'" in bad_choice.stderr


def test_unquotable_override_prints_one_line_with_the_quoted_form_that_works(tmp_path):
    result = _cli("personalize", "method=textual_inversion", "data.instance_prompt=a photo of <sks> cat", cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert "LexerNoViableAltException" not in line
    suggested = line.rsplit("quote it: ", 1)[1]
    assert suggested == "data.instance_prompt=\"'a photo of <sks> cat'\""
    # what the shell passes for the suggested form is read by Hydra as the original prompt
    shown = _cli("personalize", "method=textual_inversion", *shlex.split(suggested), "--cfg", "job", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "instance_prompt: a photo of <sks> cat" in shown.stdout
    assert not (tmp_path / "personalize").exists()


def test_override_errors_quote_strings_and_list_items_and_leave_valid_overrides_alone():
    comma = override_error(["source_prompt=a cat, wearing a hat"])
    assert "sweep" in comma and comma.endswith("source_prompt=\"'a cat, wearing a hat'\"")
    assert override_error(["--multirun", "seed=1,2"]) is None  # a sweep is what -m asks for
    apostrophe = override_error(["prompt=it's <sks>"])
    assert shlex.split(apostrophe.rsplit("quote it: ", 1)[1]) == ["prompt=\"it's <sks>\""]
    items = override_error(["method.tokens=[<my-dog>, <b c>]"])
    assert items.endswith("method.tokens=\"['<my-dog>','<b c>']\"")
    assert override_error(["method.tokens=[<a>, b"]) is None  # a broken list: Hydra's own message
    assert override_error(["steps=3", "prompt=a photo of a cat", "data.instance_prompt='a photo of <sks> cat'"]) is None


def test_sample_writes_png_and_event_file(tmp_path):
    result = _cli("sample", "model=tiny", "prompt=a photo of a cat", "steps=3", "num_images=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dirs = list((tmp_path / "sample").iterdir())
    assert len(run_dirs) == 1
    assert (run_dirs[0] / "sample_000.png").is_file()
    assert list((run_dirs[0] / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dirs[0] / ".hydra" / "config.yaml").is_file()


def test_sample_run_function_is_deterministic(tmp_path):
    from PIL import Image
    from dreamsteer.train.sample import run

    outputs = []
    for name in ("a", "b"):
        cfg = compose("sample", ["steps=2", "num_images=1", "logger=none", f"output_dir={tmp_path / name}"])
        outputs.append(Image.open(run(cfg)[0]).tobytes())
    assert outputs[0] == outputs[1]
