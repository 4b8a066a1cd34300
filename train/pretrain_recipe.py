"""`python -m train pretrain recipe=<toy|toy_gligen|file.yaml> output_dir=<folder>`: a recorded recipe, run again.

A recipe (``conf/recipes/*.yaml``) is the list of `pretrain` runs that made a model, each usually from the
export of the one before::

    result: unet         # the phase whose export (<its output_dir>/model) is the recipe's model
    dtype: float16       # that export is saved as <output_dir>/model in this dtype (the shipped models are fp16)
    phases:
      - name: vae
        args: stage=vae optim.lr=1e-3 trainer.max_steps=500 output_dir={out}/vae
      - name: unet
        args: stage=unet vae={out}/vae/model/vae trainer.max_steps=8000 output_dir={out}/unet

``{out}`` is the recipe's output_dir and ``{builtin}`` the folder of the built-in models. Each phase runs as its own
process, ``python -m train pretrain <args> ckpt_path=last`` (a DDP phase launches its workers from that command
line), so an interrupted phase resumes from its last checkpoint. A finished phase leaves
``<output_dir>/phases/<name>.json`` (its args, its wall time summed over the attempts it took, and their count) and is
skipped when the recipe runs again; a finished phase whose args have changed since is refused, before anything runs,
so one folder never mixes two recipes. An attempt that fails or is interrupted adds its time to
``<output_dir>/phases/<name>.partial.json``, which the next attempt goes on from (an attempt killed outright, with
no chance to write it, is not counted).
``recipe_until=<phase>`` stops after that phase (a long recipe split over several sittings). ``samples.every_n_steps=N``
(and the other ``samples.*`` keys) adds sample images to every VAE and UNet phase (train/pretrain_samples.py); they
change no weight, so they are not part of a phase's recorded args.
"""
from __future__ import annotations

import datetime as _dt
import json
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import yaml
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from dreamsteer.train.config import CONF_DIR, ConfigError, TaskFailed, check_output_dir, compose

RECIPES_DIR = CONF_DIR / "recipes"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# the only keys a recipe run takes from the command line: every other setting is a phase's; `samples.*` (sample
# images, which change no weight: tests/test_pretrain_samples.py) go to every phase that draws them
RECIPE_KEYS = ("recipe", "recipe_until", "output_dir", "samples.*")


@dataclass(frozen=True)
class Phase:
    name: str
    args: tuple[str, ...]  # `pretrain` overrides, {out} and {builtin} filled in
    output: Path  # its output_dir


@dataclass(frozen=True)
class Recipe:
    source: Path
    phases: tuple[Phase, ...]
    result: str
    dtype: str


def recipe_path(recipe: str) -> Path:
    """A built-in recipe's name (``conf/recipes/<name>.yaml``) or a .yaml file."""
    builtin = RECIPES_DIR / f"{recipe}.yaml"
    if re.fullmatch(r"\w+", recipe) and builtin.is_file():
        return builtin
    path = Path(recipe).expanduser()
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    raise ConfigError(f"config key 'recipe': {recipe!r} is neither a built-in recipe ({', '.join(names)}) nor a .yaml file")


def load_recipe(recipe: str, out: Path, samples: Sequence[str] = ()) -> Recipe:
    """Read and check a recipe: its keys, each phase's name and args (their pretrain settings too, with the `samples`
    overrides it will run with, except that folders made by earlier phases need not exist yet). ConfigError names the
    file and what is wrong."""
    from dreamsteer.diffusion.toy import builtin_model_dir
    from dreamsteer.train.pretrain import validate_config

    path = recipe_path(recipe)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe {path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict) or set(data) != {"phases", "result", "dtype"}:
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ConfigError(f"recipe {path}: needs exactly the keys dtype, phases, result (found {found})")
    if data["dtype"] not in DTYPES:
        raise ConfigError(f"recipe {path}: dtype {data['dtype']!r} is not one of {', '.join(DTYPES)}")
    if not isinstance(data["phases"], list) or not data["phases"]:
        raise ConfigError(f"recipe {path}: phases must be a non-empty list")
    fill = {"out": str(out), "builtin": str(builtin_model_dir("toy").parent)}
    phases: list[Phase] = []
    for i, item in enumerate(data["phases"]):
        where = f"recipe {path}, phase {i + 1}"
        if not isinstance(item, dict) or set(item) != {"name", "args"}:
            raise ConfigError(f"{where}: needs exactly the keys name and args")
        name, args = item["name"], item["args"]
        if not isinstance(name, str) or not re.fullmatch(r"\w+", name) or name in {p.name for p in phases}:
            raise ConfigError(f"{where}: name {name!r} must be a word and unique in the recipe")
        if not isinstance(args, str):
            raise ConfigError(f"{where} ({name}): args must be one string of key=value overrides")
        try:
            filled = tuple(arg.format(**fill) for arg in shlex.split(args))
        except (KeyError, ValueError, IndexError) as err:
            raise ConfigError(f"{where} ({name}): args may name only {{out}} and {{builtin}} ({err!r})") from None
        keys = [arg.partition("=")[0] for arg in filled]
        if any("=" not in arg for arg in filled) or "ckpt_path" in keys or "recipe" in keys or "recipe_until" in keys:
            raise ConfigError(f"{where} ({name}): args must be key=value overrides of pretrain, without ckpt_path "
                              f"(every phase resumes its last checkpoint) or recipe keys")
        phase_out = dict(arg.split("=", 1) for arg in filled).get("output_dir", "")
        if Path(phase_out).parent != out:
            raise ConfigError(f"{where} ({name}): output_dir must be a folder of the recipe's own, {{out}}/<folder>")
        try:
            validate_config(compose("pretrain", with_samples(filled, samples)), check_folders=False)
        except (ConfigError, HydraException, OmegaConfBaseException) as err:
            raise ConfigError(f"{where} ({name}): {str(err).splitlines()[0]}") from None
        phases.append(Phase(name, filled, Path(phase_out)))
    if data["result"] not in {p.name for p in phases}:
        raise ConfigError(f"recipe {path}: result {data['result']!r} is not one of its phases")
    return Recipe(path, tuple(phases), data["result"], data["dtype"])


def marker_path(out: Path, phase: Phase) -> Path:
    return out / "phases" / f"{phase.name}.json"


def partial_path(out: Path, phase: Phase) -> Path:
    """Where the time of a phase's unfinished attempts adds up."""
    return out / "phases" / f"{phase.name}.partial.json"


def run_phase(out: Path, phase: Phase, head: str, samples: Sequence[str]) -> None:
    """Run the phase's `pretrain` process; on success write its marker with the wall time of every attempt."""
    from dreamsteer.data.files import write_json_atomic

    partial = partial_path(out, phase)
    earlier = json.loads(partial.read_text(encoding="utf-8")) if partial.is_file() else {"wall_s": 0.0, "attempts": 0}
    start, returncode = time.time(), None
    try:
        returncode = subprocess.run([sys.executable, "-m", "dreamsteer.train", *pretrain_args(phase, samples)]).returncode
    finally:  # also on Ctrl-C: the time spent is the phase's, whether it finished or not
        spent = {"wall_s": round(earlier["wall_s"] + time.time() - start, 1), "attempts": earlier["attempts"] + 1}
        if returncode != 0:
            write_json_atomic(spent, partial)
    if returncode != 0:
        raise TaskFailed(f"{head} exited with status {returncode}; run the recipe again to resume it "
                         f"from its last checkpoint in {phase.output}")
    finished = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    write_json_atomic({"args": list(phase.args), **spent, "finished": finished}, marker_path(out, phase))
    partial.unlink(missing_ok=True)


def check_markers(out: Path, recipe: Recipe) -> None:
    """Refuse a folder where a phase finished with other args than the recipe's now."""
    for phase in recipe.phases:
        marker = marker_path(out, phase)
        if not marker.is_file():
            continue
        done = json.loads(marker.read_text(encoding="utf-8"))
        if tuple(done.get("args", ())) != phase.args:
            raise ConfigError(f"recipe {recipe.source}: phase {phase.name} finished in {out} with other args "
                              f"({marker}: {shlex.join(done.get('args', []))}); use a new output_dir, or delete "
                              f"{marker} and {phase.output} to run it again")


def check_command_line(cfg: DictConfig) -> None:
    """A recipe fixes every setting of its phases: refuse command-line overrides that would be ignored."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():  # called from Python: the caller built cfg itself
        return
    for override in HydraConfig.get().overrides.task:
        key = override.lstrip("+~").partition("=")[0]
        if key not in RECIPE_KEYS and not key.startswith("samples."):
            raise ConfigError(f"config key '{key}': a recipe run takes only {', '.join(RECIPE_KEYS)}; "
                              f"the phases' settings are the recipe's (copy it to a .yaml file to change them)")


def sample_args(cfg: DictConfig) -> list[str]:
    """The command line's `samples.*` settings as overrides (none when sampling is off)."""
    if not cfg.samples.every_n_steps:
        return []
    return [f"samples.{key}={value}" for key, value in cfg.samples.items()]


def with_samples(args: Sequence[str], samples: Sequence[str]) -> list[str]:
    """A phase's `args` and the `samples` overrides, unless it is a GLIGEN phase (which draws none)."""
    stage = dict(arg.split("=", 1) for arg in args).get("stage", "unet")
    return [*args, *(samples if stage != "gligen" else ())]


def pretrain_args(phase: Phase, samples: Sequence[str] = ()) -> list[str]:
    """The phase's `pretrain` command line: `with_samples` of its args, resumed from its last checkpoint when it has one."""
    return ["pretrain", *with_samples(phase.args, samples), "ckpt_path=last"]


def save_result(recipe: Recipe, out: Path) -> Path:
    """The result phase's export, saved as ``<out>/model`` in the recipe's dtype (atomically): a whole pipeline, or
    ``model/vae`` when the result is a VAE phase's."""
    from diffusers import AutoencoderKL, DiffusionPipeline

    from dreamsteer.diffusion.toy import save_pretrained_atomic

    (result,) = [p for p in recipe.phases if p.name == recipe.result]
    export, dtype = result.output / "model", DTYPES[recipe.dtype]
    if not (export / "model_index.json").is_file():
        vae = AutoencoderKL.from_pretrained(export / "vae", local_files_only=True, torch_dtype=torch.float32)
        save_pretrained_atomic(vae, out / "model" / "vae", dtype)
        return out / "model"
    pipe = DiffusionPipeline.from_pretrained(export, local_files_only=True, torch_dtype=torch.float32)
    return save_pretrained_atomic(pipe, out / "model", dtype)


def run_recipe(cfg: DictConfig) -> Path:
    """Run the phases of ``cfg.recipe`` in ``cfg.output_dir`` (skipping finished ones); returns ``<output_dir>/model``,
    or the last phase run's export when ``recipe_until`` stops before the end."""
    from dreamsteer.train.lock import output_lock

    check_command_line(cfg)
    if not cfg.output_dir:
        raise ConfigError("config key 'output_dir': a recipe run needs the folder its phases write to")
    check_output_dir(cfg.output_dir)
    out = Path(cfg.output_dir).expanduser().absolute()
    samples = sample_args(cfg)
    recipe = load_recipe(cfg.recipe, out, samples)
    names = [p.name for p in recipe.phases]
    if cfg.recipe_until is not None and cfg.recipe_until not in names:
        raise ConfigError(f"config key 'recipe_until': {cfg.recipe_until!r} is not a phase of {recipe.source} ({', '.join(names)})")
    check_markers(out, recipe)
    out.mkdir(parents=True, exist_ok=True)
    with output_lock(out, "pretrain recipe"):
        for i, phase in enumerate(recipe.phases, 1):
            marker = marker_path(out, phase)
            head = f"phase {i}/{len(names)} {phase.name}"
            if marker.is_file():
                print(f"{head}: finished before ({marker}), skipped", flush=True)
            else:
                print(f"{head}: python -m train {shlex.join(pretrain_args(phase, samples))}", flush=True)
                run_phase(out, phase, head, samples)
            if phase.name == cfg.recipe_until and i < len(names):
                print(f"stopped after {phase.name} (recipe_until); the same command without it runs the rest", flush=True)
                return phase.output / "model"
        model = save_result(recipe, out)
    print(f"the recipe's model ({recipe.dtype}): {model}", flush=True)
    return model
