"""`python -m train demo`: personalize -> steer -> edit -> evaluate, each stage through its own task.

The stages are the same `run(cfg)` functions the CLI runs, composed from their own configs, so the
demo exercises exactly what users run. Outputs: `<out>/1_personalize`, `2_steer`, `3_edit_baseline`,
`3_edit_steered`, `4_evaluate`, and `demo_summary.png` (source | subject mask | baseline edit |
steered edit), also logged to TensorBoard.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from omegaconf import DictConfig
from PIL import Image, ImageDraw

from dreamsteer.data.images import save_image_atomic
from dreamsteer.data.samples import SAMPLE_PHOTOS, write_sample_images, write_subject_set
from dreamsteer.train.config import LoggerConfig, ModelConfig, check_choice, check_common, compose, output_dir, validate
from dreamsteer.train.logs import summary_writer


@dataclass
class DemoConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    subject_photo: str = "cat"
    subject_images: int = 4
    source_photo: str = "cat"
    instance_prompt: str = "a photo of sks cat"
    source_prompt: str = "a photo of a cat"
    ref_prompt: str = "a photo of a sks cat"
    personalize_steps: int = 30
    steer_steps: int = 10
    edit_steps: int = 40
    editor: str = "dds_sm"
    evaluate: bool = True
    seed: int = 0
    output_dir: str | None = None
    personalize_overrides: list[str] = field(default_factory=list)
    steer_overrides: list[str] = field(default_factory=lambda: ["mode_shift.n_ms=2", "mode_shift.sampling_steps=8"])
    edit_overrides: list[str] = field(default_factory=list)


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
    cfg = validate(cfg, DemoConfig)
    check_common(cfg)
    check_choice(cfg, "subject_photo", list(SAMPLE_PHOTOS))
    check_choice(cfg, "source_photo", list(SAMPLE_PHOTOS))
    check_choice(cfg, "editor", ["dds_sm", "dds_s", "dds", "lusd", "cds", "sbp", "pds", "sds"])
    out = output_dir(cfg)
    model = [_arg("model.pretrained", cfg.model.pretrained), _arg("model.dtype", cfg.model.dtype), _arg("model.device", cfg.model.device)]
    if cfg.model.cache_dir:
        model.append(_arg("model.cache_dir", cfg.model.cache_dir))
    logger = [f"logger={cfg.logger.name}"]
    timings: dict[str, float] = {}

    subject_dir = out / "data" / "subject"
    write_subject_set(subject_dir, cfg.subject_photo, cfg.subject_images)
    source = write_sample_images(out / "data", [cfg.source_photo])[0]

    from dreamsteer.train import edit, personalize, steer

    adapter = _stage("personalize (LoRA)", lambda: personalize.run(compose("personalize", [
        *model, *logger, "method=lora",
        _arg("data.instance_dir", subject_dir), _arg("data.instance_prompt", cfg.instance_prompt),
        f"trainer.max_steps={cfg.personalize_steps}", f"seed={cfg.seed}",
        _arg("output_dir", out / "1_personalize"), *cfg.personalize_overrides])), timings)

    steered = _stage("steer (DreamSteerer)", lambda: steer.run(compose("steer", [
        *model, *logger, _arg("adapter", adapter), _arg("image", source),
        _arg("source_prompt", cfg.source_prompt), _arg("ref_prompt", cfg.ref_prompt),
        f"steps={cfg.steer_steps}", f"seed={cfg.seed}", _arg("output_dir", out / "2_steer"),
        "mode_shift.log_unguided=true", *cfg.steer_overrides])), timings)  # the demo shows guided vs unguided

    edits = {}
    for label, adapter_dir in (("baseline", adapter), ("steered", steered)):
        edits[label] = _stage(f"edit with the {label} adapter ({cfg.editor})", lambda adapter_dir=adapter_dir, label=label: edit.run(compose("edit", [
            *model, f"editor={cfg.editor}", f"editor.steps={cfg.edit_steps}", _arg("adapter", adapter_dir), _arg("image", source),
            _arg("source_prompt", cfg.source_prompt), _arg("target_prompt", cfg.ref_prompt), "id=photo",
            f"seed={cfg.seed}", _arg("output_dir", out / f"3_edit_{label}"), *cfg.edit_overrides])), timings)

    if cfg.evaluate:
        from dreamsteer.metrics.clip import build_tiny_clip
        from dreamsteer.train import evaluate

        clip_dir = build_tiny_clip(out / "data" / "tiny_clip", seed=cfg.seed)
        _stage("evaluate", lambda: evaluate.run(compose("evaluate", [
            *logger, f"runs=['{out / '3_edit_baseline'}','{out / '3_edit_steered'}']",
            "labels=[baseline,steered]", _arg("clip_model", clip_dir), _arg("concept_images", subject_dir), "ms_ssim_scales=4",
            _arg("output_dir", out / "4_evaluate")])), timings)

    summary = _summary_image(out)
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


def _summary_image(out: Path) -> Image.Image:
    """Source | subject mask | baseline edit | steered edit, labelled, side by side."""
    panels = [
        ("source", out / "3_edit_steered" / "photo_source.png"),
        ("subject mask", out / "3_edit_steered" / "photo_mask.png"),
        ("baseline edit", out / "3_edit_baseline" / "photo.png"),
        ("steered edit", out / "3_edit_steered" / "photo.png"),
    ]
    images = [(label, Image.open(path).convert("RGB")) for label, path in panels if path.is_file()]
    size = images[0][1].size[1]
    canvas = Image.new("RGB", (size * len(images), size + 16), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (label, image) in enumerate(images):
        canvas.paste(image.resize((size, size)), (i * size, 16))
        draw.text((i * size + 3, 2), label, fill="black")
    return canvas
