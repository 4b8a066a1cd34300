"""`python -m train demo`: personalize -> steer -> edit -> evaluate, each stage through its own task.

The stages are the same `run(cfg)` functions the CLI runs, composed from their own configs, so the
demo exercises exactly what users run. Two worlds (``world=``, a config group that also picks the model):

- ``toy`` (default): the built-in trained ``toy`` model; the personal subject rendered by `data.scenes`
  (a blue disc with a yellow center, "sks circle"); a rendered source scene holding an object of the
  subject's class; evaluated with the toy detector (`metrics.detector`): is the subject at that
  object's place after the edit, are the other objects and the background kept, how much changed
  outside the object.
- ``photo``: the built-in ``tiny`` model (random weights) and a bundled photo; evaluated with the
  offline tiny CLIP (the images are noise: this world proves the path, not the quality).

Outputs: `<out>/1_personalize`, `2_steer`, `3_edit_baseline`, `3_edit_steered`, `4_evaluate` (toy: the detector's
`metrics.json` and the ``evaluate`` task's `report/report.html`, both from `metrics.toy_edit.toy_edit_metrics`), and
`demo_summary.png` (toy: subject photo | source | subject mask | baseline edit | steered edit, with
the detector's subject scores; photo: the same without the subject photo), also logged to TensorBoard.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from omegaconf import DictConfig
from PIL import Image, ImageDraw

from dreamsteer.data.files import write_json_atomic
from dreamsteer.data.images import save_image_atomic
from dreamsteer.data.samples import SAMPLE_PHOTOS, write_sample_images, write_subject_set
from dreamsteer.data.scenes import (BACKGROUND_COLORS, GAP, MAX_SIZE, MIN_SIZE, OBJECT_COLORS, SHAPES, SUBJECT, Scene, SceneObject,
                                    make_caption, render, write_subject_photos)
from dreamsteer.train.config import (ConfigError, LoggerConfig, ModelConfig, check_choice, check_common, compose, model_recipe, output_dir,
                                     validate)
from dreamsteer.train.lock import output_lock
from dreamsteer.train.logs import summary_writer

WORLDS = ("toy", "photo")


@dataclass
class DemoConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    world: str = "toy"
    subject_images: int = 5
    # --- toy world
    scene_background: str = "cyan"
    scene_objects: list[str] = field(default_factory=lambda: ["red circle", "green square"])
    # --- photo world
    subject_photo: str = "cat"
    source_photo: str = "cat"
    # prompts: the photo world sets them; the toy world derives them from the scene when null
    instance_prompt: Optional[str] = None
    source_prompt: Optional[str] = None
    ref_prompt: Optional[str] = None
    personalize_steps: Optional[int] = 30  # null: the personalization recipe's
    personalize_experiment: Optional[str] = None  # a model's LoRA recipe (conf/experiment/), e.g. toy_lora
    steer_steps: int = 10
    edit_steps: int = 40
    editor: str = "dds_sm"
    evaluate: bool = True
    seed: int = 0
    output_dir: Optional[str] = None
    progress: bool = True
    threads: Optional[int] = 1  # torch CPU threads; null: torch's default (one per core)
    personalize_overrides: list[str] = field(default_factory=list)
    steer_overrides: list[str] = field(default_factory=lambda: ["mode_shift.n_ms=2", "mode_shift.sampling_steps=8"])
    edit_overrides: list[str] = field(default_factory=list)


@dataclass
class DemoInputs:
    """What the stages read: the subject photos, the source image, the prompts, and in the toy world
    the source scene's truth and the index of the object that becomes the subject."""

    subject_dir: Path
    source: Path
    instance_prompt: str
    source_prompt: str
    ref_prompt: str
    scene: Optional[Scene] = None
    index: int = 0


def _arg(key: str, value: Any) -> str:
    """A Hydra override `key=value`, quoted so prompts and paths survive Hydra's parser."""
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"{key}='{text}'"


def _stage(name: str, fn: Callable[[], Any], timings: dict[str, float]) -> Any:
    print(f"\n=== demo: {name}")
    started = time.perf_counter()
    result = fn()
    timings[name] = round(time.perf_counter() - started, 2)
    print(f"=== demo: {name} done in {timings[name]:.1f} s")
    return result


def run(cfg: DictConfig) -> dict[str, Any]:
    import torch

    cfg = validate(cfg, DemoConfig)
    check_common(cfg)
    check_choice(cfg, "world", list(WORLDS))
    check_choice(cfg, "editor", ["dds_sm", "dds_s", "dds", "lusd", "cds", "sbp", "pds", "sds"])
    if cfg.threads is not None and cfg.threads < 1:
        raise ConfigError(f"config key 'threads': {cfg.threads} must be >= 1 (or null for torch's default)")
    inputs_for = _toy_inputs if cfg.world == "toy" else _photo_inputs
    threads = torch.get_num_threads()
    out = output_dir(cfg)
    try:
        torch.set_num_threads(cfg.threads or threads)
        with output_lock(out, "demo"):
            return _run(cfg, out, inputs_for)
    finally:
        torch.set_num_threads(threads)  # the caller's again (the demo may run inside another program, e.g. the tests)


def _run(cfg: DictConfig, out: Path, inputs_for: Callable[[DictConfig, Path], DemoInputs]) -> dict[str, Any]:
    inputs = inputs_for(cfg, out)
    model = [_arg("model.pretrained", cfg.model.pretrained), _arg("model.dtype", cfg.model.dtype), _arg("model.device", cfg.model.device)]
    if cfg.model.cache_dir:
        model.append(_arg("model.cache_dir", cfg.model.cache_dir))
    logger = [f"logger={cfg.logger.name}"]
    timings: dict[str, float] = {}
    subject_dir, source = inputs.subject_dir, inputs.source

    from dreamsteer.train import edit, personalize, steer

    adapter = _stage("personalize (LoRA)", lambda: personalize.run(compose("personalize", [
        *model, *logger, "method=lora", *([f"experiment={cfg.personalize_experiment}"] if cfg.personalize_experiment else []),
        _arg("data.instance_dir", subject_dir), _arg("data.instance_prompt", inputs.instance_prompt),
        *_step_overrides(cfg), f"seed={cfg.seed}",
        _arg("output_dir", out / "1_personalize"), f"progress={cfg.progress}", *cfg.personalize_overrides])), timings)

    steered = _stage("steer (DreamSteerer)", lambda: steer.run(compose("steer", [
        *model, *logger, _arg("adapter", adapter), _arg("image", source),
        _arg("source_prompt", inputs.source_prompt), _arg("ref_prompt", inputs.ref_prompt),
        f"steps={cfg.steer_steps}", f"seed={cfg.seed}", _arg("output_dir", out / "2_steer"), f"progress={cfg.progress}",
        "mode_shift.log_unguided=true", *cfg.steer_overrides])), timings)  # the demo shows guided vs unguided

    edits = {}
    recipe = model_recipe(cfg.model.pretrained, cfg.editor)  # the model's own settings for the editor (conf/experiment/)
    for label, adapter_dir in (("baseline", adapter), ("steered", steered)):
        edits[label] = _stage(f"edit with the {label} adapter ({cfg.editor})", lambda adapter_dir=adapter_dir, label=label: edit.run(compose("edit", [
            *model, f"editor={cfg.editor}", *([f"experiment={recipe}"] if recipe else []), f"editor.steps={cfg.edit_steps}",
            _arg("adapter", adapter_dir), _arg("image", source),
            _arg("source_prompt", inputs.source_prompt), _arg("target_prompt", inputs.ref_prompt), "id=photo",
            f"seed={cfg.seed}", _arg("output_dir", out / f"3_edit_{label}"), f"progress={cfg.progress}", *cfg.edit_overrides])), timings)

    scores: dict[str, dict[str, Any]] = {}
    if cfg.evaluate and cfg.world == "toy":
        scores = _stage("evaluate (toy detector)", lambda: _toy_evaluate(out, inputs), timings)
        from dreamsteer.train import evaluate

        _stage("evaluate (report)", lambda: evaluate.run(compose("evaluate", [  # the same detector metrics, in the HTML report
            *logger, f"runs=['{out / '3_edit_baseline'}','{out / '3_edit_steered'}']", "labels=[baseline,steered]",
            _arg("output_dir", out / "4_evaluate" / "report"), f"progress={cfg.progress}"])), timings)
    elif cfg.evaluate:
        from dreamsteer.metrics.clip import build_tiny_clip
        from dreamsteer.train import evaluate

        clip_dir = build_tiny_clip(out / "data" / "tiny_clip", seed=cfg.seed)
        _stage("evaluate", lambda: evaluate.run(compose("evaluate", [
            *logger, f"runs=['{out / '3_edit_baseline'}','{out / '3_edit_steered'}']",
            "labels=[baseline,steered]", _arg("clip_model", clip_dir), _arg("concept_images", subject_dir), "ms_ssim_scales=4",
            _arg("output_dir", out / "4_evaluate"), f"progress={cfg.progress}"])), timings)

    summary = _summary_image(out, inputs, scores)
    save_image_atomic(summary, out / "demo_summary.png")
    writer = summary_writer(cfg, out)
    if writer is not None:
        writer.add_image("demo/summary", np.asarray(summary), global_step=0, dataformats="HWC")
        for stage, seconds in timings.items():
            writer.add_text("demo/timings", f"{stage}: {seconds} s", global_step=0)
        writer.close()
    print(f"\ndemo finished: {out / 'demo_summary.png'}")
    for stage, seconds in timings.items():
        print(f"  {seconds:7.1f} s  {stage}")
    return {"output_dir": out, "adapter": adapter, "steered_adapter": steered, "edits": edits, "timings": timings}


def _step_overrides(cfg: DictConfig) -> list[str]:
    """`personalize_steps` for the LoRA, and for the recipe's pivot stage too when it has one."""
    if cfg.personalize_steps is None:
        return []
    pivot_stage = _personalize_recipe(cfg).pivot.max_steps > 0
    return [f"trainer.max_steps={cfg.personalize_steps}", *([f"pivot.max_steps={cfg.personalize_steps}"] if pivot_stage else [])]


def _photo_inputs(cfg: DictConfig, out: Path) -> DemoInputs:
    check_choice(cfg, "subject_photo", list(SAMPLE_PHOTOS))
    check_choice(cfg, "source_photo", list(SAMPLE_PHOTOS))
    for key in ("instance_prompt", "source_prompt", "ref_prompt"):
        if not cfg.get(key):
            raise ConfigError(f"config key '{key}': the photo world needs it (world=photo sets it)")
    subject_dir = out / "data" / "subject"
    write_subject_set(subject_dir, cfg.subject_photo, cfg.subject_images)
    source = write_sample_images(out / "data", [cfg.source_photo])[0]
    return DemoInputs(subject_dir, source, cfg.instance_prompt, cfg.source_prompt, cfg.ref_prompt)


def row_scene(background: str, phrases: list[str]) -> Scene:
    """A toy scene with the objects named by `phrases` ("red circle") in a row, left to right, at the
    middle height, as large as the renderer's sizes allow without touching."""
    if background not in BACKGROUND_COLORS:
        raise ConfigError(f"config key 'scene_background': {background!r} is not a background color ({list(BACKGROUND_COLORS)})")
    if not 1 <= len(phrases) <= 3:
        raise ConfigError(f"config key 'scene_objects': give 1 to 3 objects, got {len(phrases)}")
    size = max(MIN_SIZE, min(MAX_SIZE, (1 / len(phrases) - GAP) / 2 * 0.95))
    objects = []
    for i, phrase in enumerate(phrases):
        words = str(phrase).split()
        if len(words) != 2 or words[0] not in OBJECT_COLORS or words[1] not in SHAPES:
            raise ConfigError(f"config key 'scene_objects[{i}]': {phrase!r} is not '<color> <shape>' "
                              f"(colors {list(OBJECT_COLORS)}, shapes {list(SHAPES)})")
        objects.append(SceneObject(words[1], words[0], ((2 * i + 1) / (2 * len(phrases)), 0.5), size))
    return render(background, objects)


def _personalize_recipe(cfg: DictConfig) -> DictConfig:
    """The personalize config of the demo's recipe and overrides, without the data (to read what it trains)."""
    return compose("personalize", ["method=lora", *([f"experiment={cfg.personalize_experiment}"] if cfg.personalize_experiment else []),
                                   *cfg.personalize_overrides, "data.instance_dir=unused", "data.instance_prompt=unused"])


def subject_word(cfg: DictConfig) -> str:
    """The word naming the subject in the toy world's prompts: the personalization recipe's pivot word when it trains on
    one (pivotal tuning, e.g. toy_lora's "<sks>"), else the subject's identifier "sks"."""
    from dreamsteer.train.personalize import prompt_words

    words = prompt_words(_personalize_recipe(cfg))
    return words[0] if words else SUBJECT.token


def _toy_inputs(cfg: DictConfig, out: Path) -> DemoInputs:
    """The rendered subject photos (with captions) and source scene; the first object of the subject's
    class becomes the subject in the reference prompt: "a red circle and ..." -> "a <word> circle and ..."
    (`subject_word`)."""
    scene = row_scene(cfg.scene_background, list(cfg.scene_objects))
    shapes = [o.shape for o in scene.objects]
    if SUBJECT.shape not in shapes:
        raise ConfigError(f"config key 'scene_objects': needs an object of the subject's class ({SUBJECT.shape}) to steer toward")
    index = shapes.index(SUBJECT.shape)
    subject_dir = out / "data" / "subject"
    word = subject_word(cfg)
    write_subject_photos(subject_dir, cfg.subject_images, seed=cfg.seed, token=word)  # each photo's caption names the word
    source = save_image_atomic(scene.image, out / "data" / "source.png")
    ref_objects = [replace(o, color=SUBJECT.color, inner_color=SUBJECT.inner_color) if i == index else o for i, o in enumerate(scene.objects)]
    subject = f"{SUBJECT.token} {SUBJECT.class_word}"
    ref_prompt = make_caption(scene.background, ref_objects).replace(subject, f"{word} {SUBJECT.class_word}", 1)
    return DemoInputs(subject_dir, source, cfg.instance_prompt or f"a {word} {SUBJECT.class_word}",
                      cfg.source_prompt or scene.caption, cfg.ref_prompt or ref_prompt, scene, index)


def _toy_evaluate(out: Path, inputs: DemoInputs) -> dict[str, dict[str, Any]]:
    """The toy detector's metrics of each edit against the source scene's truth (`metrics.toy_edit`, the
    same function as the ``evaluate`` task's report and the effects benchmark): the subject at the edited
    object's place, the other objects and the background kept, the change outside the object. Writes
    `4_evaluate/metrics.json`; returns the metrics by edit."""
    from dreamsteer.metrics.detector import SUBJECT_THRESHOLD
    from dreamsteer.metrics.toy_edit import toy_edit_metrics, truth_from_scene

    scene, index = inputs.scene, inputs.index
    targets = [replace(o, color=SUBJECT.color, inner_color=SUBJECT.inner_color) if i == index else o for i, o in enumerate(scene.objects)]
    truth = truth_from_scene(scene, targets)
    metrics: dict[str, Any] = {"source_prompt": inputs.source_prompt, "ref_prompt": inputs.ref_prompt}
    for label in ("baseline", "steered"):
        edited = Image.open(out / f"3_edit_{label}" / "photo.png").convert("RGB").resize(scene.image.size, Image.Resampling.BICUBIC)
        m = toy_edit_metrics(scene.image, edited, truth)
        m["subject"] = m["subject_score"] >= SUBJECT_THRESHOLD
        metrics[label] = m
        print(f"  {label:8s} subject score {m['subject_score']:.2f} ({'subject' if m['subject'] else 'no subject'}), "
              f"other objects {'kept' if m['others_kept'] else 'changed'}, background {'kept' if m['background_kept'] else 'changed'}, "
              f"mean change outside the object {m['outside_change']:.1f} / 255")
    write_json_atomic(metrics, out / "4_evaluate" / "metrics.json")
    return {label: metrics[label] for label in ("baseline", "steered")}


def _summary_image(out: Path, inputs: DemoInputs, scores: dict[str, dict[str, Any]]) -> Image.Image:
    """(Subject photo |) source | subject mask | baseline edit | steered edit, labelled, side by side,
    at least 128 pixels each (toy images are 32 px: enlarged without smoothing); in the toy world each edit
    is labelled with the detector's subject score and whether the background and the other objects were kept."""
    panels = [
        ("source", out / "3_edit_steered" / "photo_source.png"),
        ("subject mask", out / "3_edit_steered" / "photo_mask.png"),
        ("baseline edit", out / "3_edit_baseline" / "photo.png"),
        ("steered edit", out / "3_edit_steered" / "photo.png"),
    ]
    if inputs.scene is not None:
        panels.insert(0, ("subject photo", sorted(inputs.subject_dir.glob("*.png"))[0]))
    images = [(label, Image.open(path).convert("RGB")) for label, path in panels if path.is_file()]
    size = max(images[-1][1].size[1], 128)
    header = 40
    canvas = Image.new("RGB", (size * len(images), size + header), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (label, image) in enumerate(images):
        canvas.paste(image.resize((size, size), Image.Resampling.NEAREST), (i * size, header))
        draw.text((i * size + 3, 2), label, fill="black")
        edit = label.split()[0]
        if edit in scores:
            m = scores[edit]
            draw.text((i * size + 3, 14), f"subject score {m['subject_score']:.2f}", fill="black")
            draw.text((i * size + 3, 26), f"bg {'kept' if m['background_kept'] else 'changed'}, "
                      f"others {'kept' if m['others_kept'] else 'changed'}", fill="black")
    return canvas
