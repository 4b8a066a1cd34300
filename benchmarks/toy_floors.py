"""The toy world's floors (issue 12), measured with the detector on what the project's own tasks make.

    python -m dreamsteer.benchmarks.toy_floors                     # every part on the built-in toy models
    python -m dreamsteer.benchmarks.toy_floors --part t2i --n 20   # one part, fewer cases
    python -m dreamsteer.benchmarks.toy_floors --model tiny --n 2  # the machinery on any model (no floors met)
    python -m dreamsteer.benchmarks.toy_floors --part personalize --seed 424242 --methods lora \
        --personalize-overrides method.rank=16     # a development set: try a setting on other seeds

Beside other jobs on the same CPU, run it with ``OMP_NUM_THREADS=1`` (or ``<cores / jobs>``): idle OpenMP
threads spin by default and starve the other jobs' (docs/performance.md, "CPU threads").

Parts (each seeded; every case is drawn from seeds the pretraining never draws, see `FLOORS_SEED`; `--seed`
draws every case from another seed instead, a development set on which settings are chosen, so that the
floors' own cases never are):

- ``t2i``: text-to-image on `n` (100) random grammar captions with classifier-free guidance, by the
  backbone's diffusers pipeline with `sample`'s defaults (DDIM, 25 steps, guidance 7.5). Rates over
  captions: background color, object color and shape (caption objects paired with detected objects,
  `metrics.detector.caption_agreement`), object count on two-object captions.
- ``edit``: DDS (``editor=dds``; the model's recipe ``conf/experiment/<model>_dds.yaml`` where there is
  one, else DDS's defaults) on `n` (50) rendered source scenes, target prompt = the
  caption with one object's color changed, run as a jobs manifest through ``train edit``. Success: the
  detector reads the target scene (background, count, and every object at its place, mask IoU >= 0.5,
  with its target color and source shape). Preservation: mean absolute change (8-bit RGB) outside the
  edited object's mask dilated by `EDIT_MARGIN` pixels, against the VAE's own reconstruction error of
  the source on the same pixels (an editor that moves latents cannot get below it).
- ``personalize``: each method's recipe for the model (``conf/experiment/<model>_<m>.yaml``, else its defaults) on
  `photos` (5) rendered photos of the subject with their captions; then `per_background` samples of
  "a <token> circle on a <bg> background" per background; rate of samples where the detector finds
  the subject, against the base model on the same prompts with the DreamBooth/LoRA word.
- ``gligen``: the GLIGEN model (``toy-gligen``) with the ``generate`` task's defaults, phrases and
  boxes from `n` (50) rendered scenes; rate of phrases whose object (detected with the phrase's color
  and shape) has box IoU >= 0.5 with its box. The floor is measured with those defaults (ReGround's
  parallel wiring, beta 0.3); ``--wiring`` / ``--beta`` apply the same rule to other settings.

A part whose model cannot be loaded is reported as skipped with the loader's reason. Writes
``<out>/floors.json`` (every number, the settings, per-case records) and sample grids.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from dreamsteer.data.files import write_json_atomic
from dreamsteer.data.images import save_image_grid, tensor_to_pil
from dreamsteer.data.scenes import BACKGROUND_COLORS, SUBJECT, random_scene, write_subject_photos
from dreamsteer.diffusion.reground import WIRINGS
from dreamsteer.metrics.detector import caption_agreement, caption_rates, detect, in_box, summary
from dreamsteer.metrics.toy_edit import EDIT_MARGIN

FLOORS_SEED = 1_000_003  # cases use seeds (FLOORS_SEED, part, i): pretraining draws (seed, index) pairs
PARTS = ("t2i", "edit", "personalize", "gligen")
_PART_IDS = {part: i + 1 for i, part in enumerate(PARTS)}
METHODS = ("lora", "dreambooth", "textual_inversion", "custom_diffusion")
EDIT_CHANGE_RATIO = 2.0  # preservation floor: outside change <= this times the VAE reconstruction error there


def wilson_interval(rate: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson's score interval of a proportion `rate` of `n` trials (95% for z = 1.96):
    ``(p + z^2 / 2n +- z sqrt(p (1 - p) / n + z^2 / 4n^2)) / (1 + z^2 / n)``; unlike ``p +- z sqrt(p (1 - p) / n)``
    it stays inside [0, 1] and is not empty at p = 0 or 1."""
    scale = 1 + z * z / n
    center = (rate + z * z / (2 * n)) / scale
    half = z * np.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / scale
    return max(0.0, float(center - half)), min(1.0, float(center + half))  # rounding aside, already inside [0, 1]


@dataclass
class Floor:
    """One row of the table: `value` must satisfy ``value >= floor`` (or ``<=`` when not `higher`). A `proportion`
    (a rate of `n` cases) also gets its 95% interval: how far chance alone could move it on other cases."""

    part: str
    metric: str
    value: float
    floor: float
    higher: bool = True
    n: int = 0
    proportion: bool = True

    @property
    def met(self) -> bool:
        return self.value >= self.floor if self.higher else self.value <= self.floor

    @property
    def interval(self) -> tuple[float, float] | None:
        return wilson_interval(self.value, self.n) if self.proportion and self.n and not np.isnan(self.value) else None


class PartSkipped(Exception):
    """A part that cannot run here (its model is missing); the message says why."""


# ----------------------------------------------------------------------------- shared
def _case_seed(seed: int, part: str, i: int) -> tuple[int, int, int]:
    return (seed, _PART_IDS[part], i + 1)


def _load(model: str):
    from dreamsteer.diffusion.backbone import ModelLoadError, load_backbone

    try:
        return load_backbone(model)
    except ModelLoadError as err:
        raise PartSkipped(f"model {model!r} cannot be loaded: {err}") from None


def sampling_pipeline(backbone: Any) -> Any:
    """The backbone's diffusers pipeline with `sample`'s default scheduler (DDIM)."""
    from dreamsteer.diffusion.schedulers import make_scheduler
    from dreamsteer.train.sample import SampleConfig

    return backbone.pipeline(make_scheduler(SampleConfig.scheduler, backbone.scheduler.config))


def sample_images(backbone: Any, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: float, batch: int = 25) -> list[Image.Image]:
    """Text-to-image through the backbone's diffusers pipeline (`sample`'s path): one image per prompt,
    each from its own seeded generator, so any image is reproducible alone."""
    pipe = sampling_pipeline(backbone)
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch):
        chunk = list(prompts[start:start + batch])
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[start:start + batch]]
        images += pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=generators).images
    return images


def _rate(flags: Sequence[bool]) -> float:
    return float(np.mean(flags)) if len(flags) else float("nan")


# ----------------------------------------------------------------------------- parts
def text_to_image(model: str, n: int, out: Path, steps: int, guidance: float, seed: int = FLOORS_SEED) -> tuple[list[Floor], dict[str, Any]]:
    backbone = _load(model)
    scenes = [random_scene(_case_seed(seed, "t2i", i)) for i in range(n)]
    captions = [s.caption for s in scenes]
    images = sample_images(backbone, captions, [seed + i for i in range(n)], steps, guidance)
    records = []
    for caption, image in zip(captions, images):
        detection = detect(image)
        records.append({"caption": caption, "agreement": caption_agreement(detection, caption), "detection": summary(detection)})
    save_image_grid(images[:32], out / "t2i_samples.png")
    agree = [r["agreement"] for r in records]
    rates = caption_rates(agree)
    floors = (("background", "background color", 0.95), ("color", "object color", 0.90), ("shape", "shape", 0.80),
              ("count", "count (two-object captions)", 0.80))
    rows = [Floor("t2i", label, rates[key][0], floor, n=rates[key][1]) for key, label, floor in floors]
    info = {"steps": steps, "guidance": guidance, "exact_rate": _rate([a["exact"] for a in agree]), "cases": records}
    return rows, info


def editing(model: str, n: int, out: Path, steps: int | None, seed: int = FLOORS_SEED,
            recipes_of: str | None = None) -> tuple[list[Floor], dict[str, Any]]:
    from dreamsteer.benchmarks.toy_edits import (BACKGROUND_GROUPS, background_group, edit_case, edit_jobs, edited_image,
                                                 rates_by_group, run_edit_jobs, score_edit, vae_outside_error)
    from dreamsteer.train.config import model_recipe

    backbone = _load(model)
    cases = [edit_case("color", _case_seed(seed, "edit", i), f"scene_{i:03d}", backbone.resolution) for i in range(n)]
    jobs = edit_jobs(cases, ["dds"], out / "edit_sources", {"dds": {"steps": steps}} if steps else None)
    # the model's own DDS settings (conf/experiment/toy_dds.yaml), else DDS's defaults; `model` stays the one edited
    recipe = model_recipe(recipes_of or model, "dds")
    records_by_id = run_edit_jobs(model, jobs, out, experiment=recipe)

    records, outside, vae_outside, successes, shown = [], [], [], [], []
    for case, job in zip(cases, jobs):
        edited = edited_image(records_by_id[job["id"]])
        metrics = score_edit(case, edited)
        vae = vae_outside_error(backbone, case)
        successes.append(metrics["success"])
        outside.append(metrics["outside_change"])
        vae_outside.append(vae)
        records.append({"id": job["id"], "target_prompt": job["target_prompt"], "success": metrics["success"],
                        "outside_change": metrics["outside_change"], "vae_outside_error": vae, "detection": metrics["detection"]})
        if len(shown) < 32:
            shown += [case.scene.image, edited]
    save_image_grid(shown, out / "edit_pairs.png")
    vae_mean = float(np.mean(vae_outside))
    rows = [
        Floor("edit", f"color edit success (DDS, {f'experiment={recipe}' if recipe else 'its defaults'})", _rate(successes), 0.80, n=n),
        Floor("edit", f"outside change (<= {EDIT_CHANGE_RATIO:g}x VAE error {vae_mean:.2f})", float(np.mean(outside)),
              EDIT_CHANGE_RATIO * vae_mean, higher=False, n=n, proportion=False),
    ]
    info = {"steps": steps, "experiment": recipe, "vae_outside_error": vae_mean, "outside_change": float(np.mean(outside)),
            "outside_change_successes": float(np.mean([c for c, s in zip(outside, successes) if s])) if any(successes) else None,
            "margin_px": EDIT_MARGIN, "success_by_scene": rates_by_group(cases, successes),
            "success_by_background": rates_by_group(cases, successes, background_group, BACKGROUND_GROUPS), "cases": records}
    return rows, info


def _subject_prompts(token: str, per_background: int) -> list[str]:
    return [f"a {token} {SUBJECT.class_word} on a {bg} background" for bg in BACKGROUND_COLORS for _ in range(per_background)]


def _method_token(cfg: Any) -> str:
    """The word that names the subject in the method's prompts."""
    from dreamsteer.train.personalize import prompt_words

    words = prompt_words(cfg)  # TI / Custom Diffusion tokens, or the pivot word a LoRA / DreamBooth trains on
    return words[0] if words else SUBJECT.token


def personalization(model: str, methods: Sequence[str], out: Path, photos: int, per_background: int, steps: int,
                    guidance: float, train_steps: int | None, seed: int = FLOORS_SEED,
                    overrides: Sequence[str] = (), recipes_of: str | None = None) -> tuple[list[Floor], dict[str, Any]]:
    """Each method's recipe (`recipes_of`'s, default `model`'s; then `overrides`, Hydra keys of ``train
    personalize``) on `photos` subject photos from `seed`; the subject rate of `per_background` samples
    per background color."""
    from dreamsteer.checkpoints import load_adapter
    from dreamsteer.diffusion.backbone import load_backbone
    from dreamsteer.train import personalize
    from dreamsteer.train.config import compose, recipe_overrides

    configs = {}  # composed first: a bad override fails before any sampling or training
    for method in methods:
        run_dir = out / f"personalize_{method}"
        keys = [*recipe_overrides(model, method, recipes_of), "logger=none", f"output_dir={run_dir}",
                f"data.instance_dir={run_dir / 'photos'}", "data.instance_prompt=unused", *overrides]
        configs[method] = compose("personalize", keys + ([f"trainer.max_steps={train_steps}"] if train_steps else []))
    base = _load(model)
    seeds = [seed + i for i in range(per_background * len(BACKGROUND_COLORS))]
    base_images = sample_images(base, _subject_prompts(SUBJECT.token, per_background), seeds, steps, guidance)
    base_rate = _rate([detect(im).has_subject for im in base_images])
    save_image_grid(base_images, out / "personalize_base.png")
    rows, info = [], {"photos": photos, "samples": len(seeds), "base_rate": base_rate, "methods": {}}
    for method, cfg in configs.items():
        run_dir = Path(cfg.output_dir)
        token = _method_token(cfg)
        write_subject_photos(run_dir / "photos", photos, seed=seed, token=token)  # each photo's caption names the token
        cfg.data.instance_prompt = f"a {token} {SUBJECT.class_word}"
        started = time.perf_counter()
        adapter = personalize.run(cfg)
        train_s = time.perf_counter() - started
        tuned = load_backbone(model)
        load_adapter(tuned, adapter)
        images = sample_images(tuned, _subject_prompts(token, per_background), seeds, steps, guidance)
        flags = [detect(im).has_subject for im in images]
        save_image_grid(images, out / f"personalize_{method}.png")
        rows.append(Floor("personalize", f"{method} subject rate", _rate(flags), 0.70, n=len(flags)))
        info["methods"][method] = {"rate": _rate(flags), "token": token, "train_steps": int(cfg.trainer.max_steps),
                                   "lr": float(cfg.method.lr), "overrides": list(overrides), "train_s": round(train_s, 1),
                                   "by_background": _by_background(flags, per_background)}
    rows.append(Floor("personalize", "base model subject rate", base_rate, 0.10, higher=False, n=len(seeds)))
    return rows, info


def _by_background(flags: Sequence[bool], per_background: int) -> dict[str, int]:
    """Samples with the subject per background (`_subject_prompts` order: `per_background` per color)."""
    return {bg: int(sum(flags[i * per_background:(i + 1) * per_background])) for i, bg in enumerate(BACKGROUND_COLORS)}


def grounding(model: str, n: int, out: Path, seed: int = FLOORS_SEED, wiring: str | None = None,
              beta: float | None = None) -> tuple[list[Floor], dict[str, Any]]:
    """The gligen part with `generate`'s defaults, or the `wiring` / `beta` given."""
    from dreamsteer.diffusion.reground import grounded_sample
    from dreamsteer.train.generate import GenerateConfig

    backbone = _load(model)
    defaults = GenerateConfig()
    wiring = defaults.wiring if wiring is None else wiring
    beta = defaults.beta if beta is None else beta
    resolution = backbone.resolution
    hits, all_hits, records, images = [], [], [], []
    for i in range(n):
        scene = random_scene(_case_seed(seed, "gligen", i), resolution=resolution)
        boxes = (scene.boxes / resolution).tolist()
        latents = grounded_sample(backbone, scene.caption, scene.phrases, boxes, wiring, beta, defaults.steps,
                                  torch.Generator().manual_seed(seed + i), guidance_scale=defaults.guidance_scale,
                                  scheduler=defaults.scheduler)
        with torch.no_grad():
            image = tensor_to_pil(backbone.decode(latents)[0].float().clamp(-1, 1))
        detection = detect(image)
        case = [in_box(detection, obj.color, obj.shape, box) for obj, box in zip(scene.objects, scene.boxes)]
        hits += case
        all_hits.append(all(case))
        records.append({"caption": scene.caption, "boxes": scene.boxes.tolist(), "hits": case, "detection": summary(detection)})
        images.append(image)
    save_image_grid(images[:32], out / "gligen_samples.png")
    rows = [Floor("gligen", f"phrase in its box, IoU >= 0.5 ({wiring}, beta {beta:g})", _rate(hits), 0.80, n=len(hits))]
    info = {"wiring": wiring, "beta": beta, "steps": defaults.steps, "sample_rate": _rate(all_hits), "cases": records}
    return rows, info


# ----------------------------------------------------------------------------- table
def format_table(rows: Sequence[Floor], skipped: dict[str, str]) -> str:
    lines = ["| part | metric | measured | floor | met | n | 95% interval |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        floor = f"{'>=' if r.higher else '<='} {r.floor:.3g}"
        interval = f"{r.interval[0]:.2f}-{r.interval[1]:.2f}" if r.interval else ""
        lines.append(f"| {r.part} | {r.metric} | {r.value:.3f} | {floor} | {'yes' if r.met else 'NO'} | {r.n} | {interval} |")
    for part, why in skipped.items():
        lines.append(f"| {part} | skipped: {why} | | | | | |")
    return "\n".join(lines)


def run(parts: Sequence[str], model: str, gligen_model: str, out: Path, n: int | None = None, steps: int = 25, guidance: float = 7.5,
        edit_steps: int | None = None, methods: Sequence[str] = METHODS, photos: int = 5, per_background: int = 5,
        train_steps: int | None = None, seed: int = FLOORS_SEED, personalize_overrides: Sequence[str] = (),
        recipes_of: str | None = None, wiring: str | None = None, beta: float | None = None) -> dict[str, Any]:
    """Measure `parts`; returns (and writes to ``<out>/floors.json``) the rows, skipped parts and details.
    `n` overrides each part's case count (t2i 100, edit 50, gligen 50); `seed` replaces `FLOORS_SEED`
    (a development set); `recipes_of` names the model whose recipes (``conf/experiment/<name>_*.yaml``)
    the edit and personalize parts use for `model` (default: `model`'s own); `wiring` / `beta` the gligen
    part's sampling (default: `generate`'s, the floor's)."""
    out.mkdir(parents=True, exist_ok=True)
    jobs: dict[str, Callable[[], tuple[list[Floor], dict[str, Any]]]] = {
        "t2i": lambda: text_to_image(model, n or 100, out, steps, guidance, seed),
        "edit": lambda: editing(model, n or 50, out, edit_steps, seed, recipes_of),
        "personalize": lambda: personalization(model, methods, out, photos, per_background, steps, guidance, train_steps, seed,
                                               personalize_overrides, recipes_of),
        "gligen": lambda: grounding(gligen_model, n or 50, out, seed, wiring, beta),
    }
    rows: list[Floor] = []
    skipped: dict[str, str] = {}
    details: dict[str, Any] = {}
    for part in parts:
        started = time.perf_counter()
        try:
            part_rows, details[part] = jobs[part]()
        except PartSkipped as err:
            skipped[part] = str(err)
            continue
        details[part]["seconds"] = round(time.perf_counter() - started, 1)
        rows += part_rows
    result = {"model": model, "recipes_of": recipes_of or model, "gligen_model": gligen_model, "seed": seed,
              "rows": [r.__dict__ | {"met": r.met, "interval": r.interval} for r in rows], "skipped": skipped, "details": details, "table": format_table(rows, skipped)}
    write_json_atomic(result, out / "floors.json")
    return result


def _format_rates(rates: dict[str, dict[str, int]], separator: str) -> str:
    """`toy_edits.rates_by_group`'s counts as ``group successes/cases`` items."""
    return separator.join(f"{g} {c['successes']}/{c['cases']}" for g, c in rates.items())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=(*PARTS, "all"), default="all")
    parser.add_argument("--model", default="toy", help="text-to-image model for t2i / edit / personalize (default: toy)")
    parser.add_argument("--gligen-model", default="toy-gligen")
    parser.add_argument("--n", type=int, default=None, help="cases per part (default: t2i 100, edit 50, gligen 50)")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps (t2i, personalization samples)")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--edit-steps", type=int, default=None, help="DDS steps (default: the editor's)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--per-background", type=int, default=5, help="personalization samples per background color")
    parser.add_argument("--train-steps", type=int, default=None, help="personalization steps (default: the recipe's)")
    parser.add_argument("--seed", type=int, default=FLOORS_SEED,
                        help=f"draw every case from this seed instead of the floors' {FLOORS_SEED} (a development set)")
    parser.add_argument("--personalize-overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="Hydra overrides of `train personalize` after each method's recipe (e.g. method.lr=5e-4)")
    parser.add_argument("--recipes-of", default=None, metavar="MODEL",
                        help="use MODEL's recipes (conf/experiment/MODEL_*.yaml) for --model, e.g. --recipes-of toy "
                             "for the folder of a re-trained toy model (default: --model's own; a folder has none)")
    parser.add_argument("--wiring", choices=WIRINGS, default=None,
                        help="gligen part: GLIGEN's sequential wiring or ReGround's parallel one (default: generate's, the floor's)")
    parser.add_argument("--beta", type=float, default=None,
                        help="gligen part: fraction of the steps with the grounding on (default: generate's, the floor's)")
    parser.add_argument("--out", type=Path, default=Path("outputs") / "toy_floors")
    args = parser.parse_args(argv)
    if args.n is not None and args.n < 1:
        parser.error("--n must be >= 1")
    if args.beta is not None and not 0.0 <= args.beta <= 1.0:
        parser.error("--beta must lie in [0, 1]")
    parts = PARTS if args.part == "all" else (args.part,)
    result = run(parts, args.model, args.gligen_model, args.out, args.n, args.steps, args.guidance, args.edit_steps, args.methods,
                 per_background=args.per_background, train_steps=args.train_steps, seed=args.seed,
                 personalize_overrides=args.personalize_overrides, recipes_of=args.recipes_of, wiring=args.wiring, beta=args.beta)
    if args.seed != FLOORS_SEED:
        print(f"development set: cases from seed {args.seed}, not the floors' {FLOORS_SEED}")
    print(result["table"])
    for method, m in result["details"].get("personalize", {}).get("methods", {}).items():
        print(f"{method} subject per background: " + ", ".join(f"{bg} {k}/{args.per_background}" for bg, k in m["by_background"].items()))
    by_scene = result["details"].get("edit", {}).get("success_by_scene")
    if by_scene:
        print("\nedit success by scene: " + _format_rates(by_scene, ", "))
        print("edit success by background: " + _format_rates(result["details"]["edit"]["success_by_background"], "; "))
    print(f"\nwrote {args.out / 'floors.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
