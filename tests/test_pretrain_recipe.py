"""`train pretrain recipe=...`: the shipped models' recorded recipes, run again phase by phase (train/pretrain_recipe.py).

The built-in recipes run here with their sizes and steps shrunk, each phase a real `pretrain` process: toy's two (both
DDP) end to end by default, toy_gligen's five in the slow tests (`make test-all`)."""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dreamsteer.train.config import CONF_DIR, ConfigError, TaskFailed, compose
from dreamsteer.train.pretrain_recipe import load_recipe

TINY = ("arch.resolution=16 arch.vae_channels=[16,16] arch.unet_channels=[16,32] arch.attention_heads=8 "
        "arch.text_width=32 arch.text_layers=1 data.num_workers=0 optim.warmup_steps=1 logger=none "
        "trainer.checkpoint_every_n_steps=1 trainer.export_every_n_steps=0")


def shrunk(recipe: str, tmp_path: Path) -> Path:
    """The built-in recipe as a file with tiny sizes: steps / 2000, at least 2 (so a continued run still has steps
    left), batch 2, one checkpoint per step; DDP phases stay DDP."""
    data = yaml.safe_load((CONF_DIR / "recipes" / f"{recipe}.yaml").read_text())
    for phase in data["phases"]:
        args = re.sub(r"trainer\.max_steps=(\d+)", lambda m: f"trainer.max_steps={max(2, int(m.group(1)) // 2000)}", phase["args"])
        args = re.sub(r"data\.batch_size=\d+", "data.batch_size=2", args)
        args = re.sub(r"(data\.num_workers|trainer\.checkpoint_every_n_steps)=\d+ ?", "", args)
        args = args.replace("arch.attention_heads=2 ", "")
        tiny = TINY.replace("arch.resolution=16 ", "") if recipe == "toy_gligen" else TINY  # on the shipped VAE: 32 px
        phase["args"] = f"{args} {tiny}"
    path = tmp_path / f"{recipe}_tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_recipe(recipe, out, *extra: str) -> Path:
    from dreamsteer.train.pretrain import run

    return run(compose("pretrain", [f"recipe={recipe}", f"output_dir={out}", *extra]))


def no_subprocess(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a phase ran: {args}")

    monkeypatch.setattr(subprocess, "run", refuse)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(next(folder.glob("*.safetensors")))


def assert_fp16_copy(saved_folder: Path, exported_folder: Path) -> None:
    """The recipe's saved result is the phase's export, every tensor of it cast to fp16."""
    saved, exported = weights(saved_folder), weights(exported_folder)
    assert saved.keys() == exported.keys()
    assert all(saved[k].dtype == torch.float16 and torch.equal(saved[k], exported[k].half()) for k in saved)


SAMPLES = ("samples.every_n_steps=2", "samples.count=4")


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """The whole toy recipe, shrunk, with sample images every 2 steps (about a minute on 2 CPU cores)."""
    root = tmp_path_factory.mktemp("recipe")
    out, recipe = root / "toy", shrunk("toy", root)
    return out, run_recipe(recipe, out, *SAMPLES), recipe


def test_the_built_in_recipes_are_the_documented_phases():
    """conf/recipes/*.yaml hold docs/toy.md's tables: the same phases in the same order, each command's settings."""
    docs = (Path(__file__).resolve().parent.parent / "docs" / "toy.md").read_text()
    out = Path("/runs").absolute()
    for recipe, count, result in (("toy", 2, "unet"), ("toy_gligen", 5, "gligen5")):
        loaded = load_recipe(recipe, out)
        assert len(loaded.phases) == count and loaded.result == result and loaded.dtype == "float16"
        for phase in loaded.phases:  # every setting of a phase is in the docs' table (paths aside)
            for arg in phase.args:
                key, _, value = arg.partition("=")
                if key in ("output_dir", "vae", "init"):
                    continue
                assert f"{key}={value}" in docs, (recipe, phase.name, arg)


def test_the_toy_recipe_trains_the_unet_on_its_own_vae_and_saves_it_in_fp16(toy_run):
    """Both phases from scratch (DDP), shrunk: the result is the UNet phase's export, with phase 1's VAE."""
    from dreamsteer.diffusion.backbone import load_backbone

    out, model, _ = toy_run
    assert model == out / "model" and sorted(p.stem for p in (out / "phases").glob("*.json")) == ["unet", "vae"]
    for part, phase in (("unet", "unet"), ("text_encoder", "unet"), ("vae", "vae")):
        assert_fp16_copy(model / part, out / phase / "model" / part)
    args = json.loads((out / "phases" / "unet.json").read_text())["args"]
    assert f"vae={out.absolute() / 'vae' / 'model' / 'vae'}" in args
    unet = torch.load(out / "unet" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert unet["global_step"] == 10  # 20000 steps / 2000
    assert unet["epoch"] == 0  # DDP: each process drew its own scenes, none seen twice
    assert load_backbone(str(model)).resolution == 16


def test_the_phases_record_the_recipe_s_args_and_time_and_draw_the_samples(toy_run):
    out, _, recipe = toy_run
    for phase in load_recipe(str(recipe), out).phases:  # the samples are drawn, and not part of the recorded args
        marker = json.loads((out / "phases" / f"{phase.name}.json").read_text())
        assert marker["args"] == list(phase.args) and marker["wall_s"] > 0 and marker["attempts"] == 1
        assert (phase.output / "samples" / "step000002.png").is_file(), phase.name
    assert sorted(p.name for p in (out / "unet" / "samples").glob("*.json")) == [f"step{s:06d}.json" for s in (2, 4, 6, 8, 10)]


@pytest.mark.slow
def test_the_toy_gligen_recipe_runs_every_phase_and_saves_a_gligen_model(tmp_path):
    from dreamsteer.diffusion.backbone import load_backbone
    from dreamsteer.diffusion.gligen import is_gligen

    out = tmp_path / "gligen"
    model = run_recipe(shrunk("toy_gligen", tmp_path), out)
    assert sorted(p.stem for p in (out / "phases").glob("*.json")) == [f"gligen{i}" for i in range(1, 6)]
    assert is_gligen(load_backbone(str(model)).unet)
    saved, exported = weights(model / "unet"), weights(out / "gligen5" / "model" / "unet")
    assert all(saved[k].dtype == torch.float16 and torch.equal(saved[k], exported[k].half()) for k in saved)
    # phases 4-5 keep phase 1's text encoder (the phrases' embeddings GLIGEN's layers read)
    first, last = weights(out / "gligen1" / "model" / "text_encoder"), weights(out / "gligen5" / "model" / "text_encoder")
    assert all(torch.equal(first[k], last[k]) for k in first)


def test_a_finished_recipe_runs_no_phase_again(toy_run, monkeypatch):
    out, model, recipe = toy_run
    before = weights(model / "unet")
    no_subprocess(monkeypatch)
    assert run_recipe(recipe, out, *SAMPLES) == model
    after = weights(model / "unet")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_phase_whose_args_changed_since_it_finished_is_refused_before_anything_runs(toy_run, tmp_path, monkeypatch):
    out, _, recipe = toy_run
    data = yaml.safe_load(recipe.read_text())
    data["phases"][0]["args"] = data["phases"][0]["args"].replace("seed=21", "seed=11")
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(data))
    no_subprocess(monkeypatch)
    with pytest.raises(ConfigError, match=r"phase vae finished in .* with other args .*seed=21.*phases/vae\.json"):
        run_recipe(changed, out)


def test_recipe_until_stops_after_its_phase_and_the_same_command_without_it_runs_the_rest(tmp_path, capfd):
    recipe, out = shrunk("toy", tmp_path), tmp_path / "split"
    first = run_recipe(recipe, out, "recipe_until=vae")
    assert first == out / "vae" / "model" and (first / "vae").is_dir()
    assert sorted(p.stem for p in (out / "phases").glob("*.json")) == ["vae"] and not (out / "unet").exists()
    vae = weights(out / "vae" / "model" / "vae")
    capfd.readouterr()
    assert run_recipe(recipe, out) == out / "model"
    printed = "".join(capfd.readouterr())
    assert "phase 1/2 vae: finished before" in printed and "phase 2/2 unet" in printed
    assert sorted(p.stem for p in (out / "phases").glob("*.json")) == ["unet", "vae"]
    assert all(torch.equal(vae[k], weights(out / "vae" / "model" / "vae")[k]) for k in vae)  # phase 1 not run again
    assert all(torch.equal(vae[k].half(), weights(out / "model" / "vae")[k]) for k in vae)  # and the result's VAE is it


def test_a_finished_phase_is_skipped_and_one_whose_args_changed_is_refused_before_anything_runs(tmp_path, monkeypatch):
    recipe, out = tmp_path / "one.yaml", tmp_path / "one"
    phase = {"name": "vae", "args": f"stage=vae trainer.max_steps=2 seed=3 output_dir={{out}}/vae {TINY}"}
    recipe.write_text(yaml.safe_dump({"result": "vae", "dtype": "float32", "phases": [phase]}))
    assert run_recipe(recipe, out) == out / "model"
    vae = weights(out / "vae" / "model" / "vae")
    assert all(torch.equal(vae[k], weights(out / "model" / "vae")[k]) for k in vae)  # a VAE recipe's result: model/vae
    with monkeypatch.context() as patched:
        no_subprocess(patched)
        run_recipe(recipe, out)  # finished: nothing runs
    assert all(torch.equal(vae[k], weights(out / "vae" / "model" / "vae")[k]) for k in vae)
    recipe.write_text(yaml.safe_dump({"result": "vae", "dtype": "float32", "phases": [{**phase, "args": phase["args"].replace("seed=3", "seed=4")}]}))
    no_subprocess(monkeypatch)
    with pytest.raises(ConfigError, match=r"phase vae finished in .* with other args .*seed=3.*phases/vae\.json"):
        run_recipe(recipe, out)


def test_a_failed_phase_stops_the_recipe_without_marking_it_done(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text(yaml.safe_dump({"result": "unet", "dtype": "float16", "phases": [
        {"name": "unet", "args": f"stage=unet vae={{out}}/missing/vae output_dir={{out}}/unet {TINY}"}]}))
    with pytest.raises(TaskFailed, match=r"phase 1/1 unet exited with status \d+; run the recipe again"):
        run_recipe(recipe, tmp_path / "out")
    assert not (tmp_path / "out" / "phases" / "unet.json").exists() and not (tmp_path / "out" / "model").exists()
    assert json.loads((tmp_path / "out" / "phases" / "unet.partial.json").read_text())["attempts"] == 1


def test_a_phase_records_the_time_of_every_attempt_it_took(tmp_path, monkeypatch):
    """Two attempts cut short (a failure, then Ctrl-C), then one that finishes: the marker sums the three."""
    recipe, out = tmp_path / "one.yaml", tmp_path / "out"
    recipe.write_text(yaml.safe_dump({"result": "vae", "dtype": "float32", "phases": [
        {"name": "vae", "args": f"stage=vae trainer.max_steps=2 output_dir={{out}}/vae {TINY}"}]}))
    outcomes = iter([1, KeyboardInterrupt, 0])

    def attempt(args, **kwargs):
        time.sleep(0.3)
        outcome = next(outcomes)
        if outcome is KeyboardInterrupt:
            raise KeyboardInterrupt
        return subprocess.CompletedProcess(args, outcome)

    monkeypatch.setattr(subprocess, "run", attempt)
    monkeypatch.setattr("dreamsteer.train.pretrain_recipe.save_result", lambda recipe, out: out / "model")
    with pytest.raises(TaskFailed):
        run_recipe(recipe, out)
    first = json.loads((out / "phases" / "vae.partial.json").read_text())
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, out)
    second = json.loads((out / "phases" / "vae.partial.json").read_text())
    run_recipe(recipe, out)
    marker = json.loads((out / "phases" / "vae.json").read_text())
    assert (first["attempts"], second["attempts"], marker["attempts"]) == (1, 2, 3)
    assert 0.3 <= first["wall_s"] < second["wall_s"] < marker["wall_s"] and marker["wall_s"] >= 0.9
    assert not (out / "phases" / "vae.partial.json").exists()


GOOD = {"result": "a", "dtype": "float16", "phases": [{"name": "a", "args": "stage=vae output_dir={out}/a"}]}


@pytest.mark.parametrize("change, message", [
    ({"phases": []}, "phases must be a non-empty list"),
    ({"extra": 1}, "needs exactly the keys dtype, phases, result"),
    ({"dtype": "int8"}, "dtype 'int8' is not one of"),
    ({"result": "b"}, "result 'b' is not one of its phases"),
    ({"phases": [{"name": "a", "args": "stage=vae output_dir={out}/a"}] * 2}, "name 'a' must be a word and unique"),
    ({"phases": [{"name": "a", "args": "stage=vae ckpt_path=last output_dir={out}/a"}]}, "without ckpt_path"),
    ({"phases": [{"name": "a", "args": "stage=vae output_dir=/elsewhere/a"}]}, "output_dir must be a folder of the recipe's own"),
    ({"phases": [{"name": "a", "args": "stage=vae output_dir={somewhere}/a"}]}, "may name only {out} and {builtin}"),
    ({"phases": [{"name": "a", "args": "stage=vae optim.lrr=1 output_dir={out}/a"}]}, "phase 1 \\(a\\): Could not override 'optim.lrr'"),
    ({"phases": [{"name": "a", "args": "stage=vea output_dir={out}/a"}]}, "phase 1 \\(a\\): config key 'stage'"),
    ({"phases": [{"name": "a", "args": ["stage=vae"]}]}, "args must be one string"),
])
def test_a_bad_recipe_is_refused_naming_the_file_before_anything_runs(tmp_path, monkeypatch, change, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump({**GOOD, **change}))
    no_subprocess(monkeypatch)
    with pytest.raises(ConfigError, match=message) as err:
        run_recipe(recipe, tmp_path / "out")
    assert str(recipe) in str(err.value)
    assert not (tmp_path / "out").exists()


def test_unknown_recipe_and_phase_names_are_refused(tmp_path, monkeypatch):
    no_subprocess(monkeypatch)
    with pytest.raises(ConfigError, match=r"'recipe': 'toyy' is neither a built-in recipe \(toy, toy_gligen\)"):
        run_recipe("toyy", tmp_path / "out")
    with pytest.raises(ConfigError, match=r"'recipe_until': 'pair4' is not a phase of .*toy.yaml"):
        run_recipe("toy", tmp_path / "out", "recipe_until=pair4")


def test_the_command_line_refuses_settings_a_recipe_would_ignore(tmp_path):
    done = subprocess.run([sys.executable, "-m", "dreamsteer.train", "pretrain", "recipe=toy", f"output_dir={tmp_path / 'out'}",
                           "trainer.devices=1"], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert "config key 'trainer.devices': a recipe run takes only recipe, recipe_until, output_dir" in done.stderr
    assert not (tmp_path / "out" / "phases").exists()


def test_sample_settings_go_to_every_phase_but_gligen_s_and_are_checked_before_anything_runs(tmp_path):
    from dreamsteer.train.pretrain_recipe import pretrain_args

    samples = ["samples.every_n_steps=500", "samples.count=8"]
    for name in ("toy", "toy_gligen"):
        for phase in load_recipe(name, tmp_path).phases:
            gligen = "stage=gligen" in phase.args
            assert pretrain_args(phase, samples) == ["pretrain", *phase.args, *([] if gligen else samples), "ckpt_path=last"]
    # from the command line: past the check of recipe keys, refused by the first phase's settings check
    done = subprocess.run([sys.executable, "-m", "dreamsteer.train", "pretrain", "recipe=toy", f"output_dir={tmp_path / 'out'}",
                           "samples.every_n_steps=100", "samples.count=0"], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert "phase 1 (vae): config keys 'samples.*'" in done.stderr and "count 0 in [1, 64]" in done.stderr
    assert not (tmp_path / "out" / "phases").exists()
