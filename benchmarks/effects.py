"""The papers' claims in miniature (issue 14): what every method does on the toy world, measured.

    python -m dreamsteer.benchmarks.effects                          # every part -> docs/effects.md, docs/effects.json, docs/effects/
    python -m dreamsteer.benchmarks.effects --part edit --n 2        # one part, fewer cases (the other parts' results are kept)
    python -m dreamsteer.benchmarks.effects --part steer personalize --workers 2

Parts (every case from seeds ``(EFFECTS_SEED, part, ...)``, which neither the pretraining nor the
floors draw; the built-in ``toy`` model, ``toy-gligen`` for ReGround):

- ``edit``: SDS, DDS, CDS, SBP, PDS, LUSD and Ground-A-Score on `n` rendered source scenes per edit
  kind (`benchmarks.toy_edits.EDIT_KINDS`: one object's color, one object's shape, both objects'
  colors), each method with its reference defaults at `step_fraction` of its default step count,
  through the ``edit`` task. Scored by `metrics.toy_edit.toy_edit_metrics` (success, targets hit,
  other objects / background kept, change outside the edited objects, box IoU) and the edit's wall time.
- ``steer``: per baseline (DreamBooth, LoRA, Textual Inversion, Custom Diffusion; each trained with
  the toy model's recipe, `train.config.recipe_overrides`, on rendered photos of the subject), `n` source scenes holding a circle: the
  circle is edited into the subject with DDS-S and DDS-SM, with the baseline adapter and with the
  adapter steered (DreamSteerer, the ``steer`` task) toward the scene. Ablations (LoRA, the first
  `ablation_n` scenes, DDS-SM): J in {-1, 0, +1}, mode shifting off, subject mask off, steering steps.
- ``reground``: `toy-gligen` with captions naming two objects of which only the first is grounded
  (phrase + box): sequential (GLIGEN) vs parallel (ReGround) wiring per beta of scheduled sampling;
  spatial grounding (the grounded object, its color and shape, has box IoU >= 0.5 with its box) and
  textual grounding (the ungrounded object, its color and shape, is anywhere in the image).
- ``personalize``: per method, the subject rate, subject score and background kept on "a <token>
  circle on a <bg> background" sampled at several training steps, and the export's size.

Writes `<json>` (every number, the settings, per-case records), `<md>` (tables rendered from that
JSON, keeping the parts not run this time) and PNG grids in `<figures>`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from dreamsteer.benchmarks.toy_edits import (EDIT_KINDS, EditCase, edit_case, edit_jobs, edited_image, run_edit_jobs, score_edit,
                                             vae_reconstruction)
from dreamsteer.checkpoints import read_manifest
from dreamsteer.data.files import write_json_atomic, write_text_atomic
from dreamsteer.data.images import save_image_atomic, tensor_to_pil
from dreamsteer.data.scenes import (BACKGROUND_COLORS, OBJECT_COLORS, SHAPES, SUBJECT, SceneObject, render,
                                    sample_objects, write_subject_photos)
from dreamsteer.metrics.detector import detect, in_box, summary
from dreamsteer.metrics.toy_edit import mean_metrics

EFFECTS_SEED = 2_000_003
PARTS = ("edit", "steer", "reground", "personalize")
_PART_IDS = {part: i + 1 for i, part in enumerate(PARTS)}
EDIT_METHODS = ("sds", "dds", "cds", "sbp", "pds", "lusd", "ground_a_score")
NO_EDIT = "vae only"  # the control row: the source encoded and decoded, scored as if it were an edit
BASELINES = ("dreambooth", "lora", "textual_inversion", "custom_diffusion")
STEER_EDITORS = ("dds_s", "dds_sm")
ABLATIONS: dict[str, tuple[str, list[str]]] = {  # id -> (label, steer task overrides) against the default (J = -1, 10 steps)
    "J0": ("J = 0", ["edsd.jacobian=0"]),
    "Jplus1": ("J = +1", ["edsd.jacobian=1"]),
    "no_mode_shift": ("no mode shifting", ["mode_shift.lambda_ms=0"]),
    "no_mask": ("no subject mask", ["mask.enabled=false"]),
    "steps5": ("5 steering steps", ["steps=5"]),
    "steps20": ("20 steering steps", ["steps=20"]),
}
REGROUND_BETAS = (0.3, 0.6, 1.0)
WIRINGS = ("sequential", "parallel")
GRID_ROWS = 4  # cases shown per figure
PANEL = 64  # pixels per image in the figures (toy images are 32 px, enlarged without smoothing)


class PartSkipped(Exception):
    """A part that cannot run here (its model is missing); the message says why."""


@dataclass
class Settings:
    """Everything that decides the numbers (recorded in the JSON)."""

    model: str = "toy"
    gligen_model: str = "toy-gligen"
    n_edit: int = 4  # cases per edit kind
    n_steer: int = 3  # source scenes per baseline
    n_reground: int = 12  # captions per (beta, wiring)
    ablation_n: int = 2  # steer ablations: the first scenes
    step_fraction: float = 0.5  # editors run this fraction of their default step counts
    editor_guidance: float | None = None  # edit and steer parts: every editor's guidance and the steering's DDS-S direction's (None: defaults, 7.5)
    train_steps: int | None = None  # personalization steps (None: the recipes' 400)
    probes: tuple[float, ...] = (0.25, 0.5, 1.0)  # personalization: sample at these fractions of the training steps
    per_background: int = 2  # personalization samples per background color at each probe
    photos: int = 5  # subject photos for personalization
    steer_overrides: tuple[str, ...] = ("mode_shift.n_ms=2", "mode_shift.sampling_steps=10")
    sample_steps: int = 25
    guidance: float = 7.5
    workers: int = 2  # edit-task processes (one per core of a 2-core CPU)

    def editor_overrides(self, steps: int) -> dict[str, Any]:
        """An edit job's editor overrides: its step count, and `editor_guidance` when set."""
        return {"steps": steps, **({"guidance": self.editor_guidance} if self.editor_guidance is not None else {})}

    def steering_overrides(self) -> tuple[str, ...]:
        """`train steer` overrides: `steer_overrides`, and with `editor_guidance` the guidance of EDSD's DDS-S direction too
        (`edsd.guidance_src`, `edsd.guidance_ref`): that direction is one edit step, so it runs at the editors' guidance."""
        g = self.editor_guidance
        return self.steer_overrides + ((f"edsd.guidance_src={g:g}", f"edsd.guidance_ref={g:g}") if g is not None else ())


def _seed(part: str, *rest: int) -> tuple[int, ...]:
    return (EFFECTS_SEED, _PART_IDS[part], *rest)


def _load(model: str):
    from dreamsteer.diffusion.backbone import ModelLoadError, load_backbone

    try:
        return load_backbone(model)
    except ModelLoadError as err:
        raise PartSkipped(f"model {model!r} cannot be loaded: {err}") from None


def _steps(method: str, fraction: float) -> int:
    from dreamsteer.distill.config import method_defaults

    return max(1, round(method_defaults(method)["steps"] * fraction))


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [float(v) for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _fresh(folder: Path) -> Path:
    """An empty work folder (a previous run's outputs there would be taken as done by the edit task)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


# ----------------------------------------------------------------------------- figures
def labelled_grid(rows: Sequence[Sequence[Image.Image | None]], header: Sequence[str], path: Path, row_labels: Sequence[str] = ()) -> Path:
    """A table of images (None: an empty cell) under a header of column labels, optional row labels at
    the left; every image enlarged to `PANEL` pixels without smoothing."""
    label_w = 8 + 6 * max((len(s) for s in row_labels), default=0) if row_labels else 0
    cell = PANEL + 4
    width = label_w + cell * len(header)
    canvas = Image.new("RGB", (width, 14 + cell * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, text in enumerate(header):
        draw.text((label_w + c * cell + 2, 1), text[: cell // 6], fill="black")
    for r, images in enumerate(rows):
        y = 14 + r * cell
        if row_labels:
            draw.text((2, y + PANEL // 2 - 5), row_labels[r], fill="black")
        for c, image in enumerate(images):
            if image is not None:
                canvas.paste(image.convert("RGB").resize((PANEL, PANEL), Image.Resampling.NEAREST), (label_w + c * cell + 2, y + 2))
    return save_image_atomic(canvas, path)


# ----------------------------------------------------------------------------- personalization (shared by two parts)
class SubjectProbe:
    """A Lightning callback sampling the subject prompts from the model being trained at chosen steps;
    `results[step]` holds the detector's reading of each sample."""

    def __init__(self, steps: Sequence[int], prompts: Sequence[str], backgrounds: Sequence[str], sample_steps: int, guidance: float, seed: int):
        import lightning as L

        self.steps, self.prompts, self.backgrounds = set(steps), list(prompts), list(backgrounds)
        self.sample_steps, self.guidance, self.seed = sample_steps, guidance, seed
        self.results: dict[int, dict[str, Any]] = {}
        self.images: dict[int, list[Image.Image]] = {}
        self.callback = type("SubjectProbeCallback", (L.Callback,), {
            "on_train_start": lambda _, trainer, module: self.probe(0, module) if 0 in self.steps else None,
            "on_train_batch_end": lambda _, trainer, module, *args: self.probe(trainer.global_step, module),
        })()

    def probe(self, step: int, module: Any) -> None:
        if step not in self.steps or step in self.results:
            return
        images = module.sample_images(self.prompts, 1, self.sample_steps, self.guidance, self.seed)
        self.images[step] = images
        self.results[step] = subject_readings(images, self.backgrounds)


def subject_readings(images: Sequence[Image.Image], backgrounds: Sequence[str]) -> dict[str, Any]:
    """Subject rate, mean subject score and background kept of samples of "a <token> circle on a <bg> background"."""
    detections = [detect(im) for im in images]
    return {"subject_rate": float(np.mean([d.has_subject for d in detections])),
            "subject_score": float(np.mean([d.subject_score for d in detections])),
            "background_kept": float(np.mean([d.background == bg for d, bg in zip(detections, backgrounds)])),
            "n": len(detections)}


def subject_prompts(token: str, per_background: int) -> tuple[list[str], list[str]]:
    backgrounds = [bg for bg in BACKGROUND_COLORS for _ in range(per_background)]
    return [f"a {token} {SUBJECT.class_word} on a {bg} background" for bg in backgrounds], backgrounds


@dataclass
class Personalized:
    method: str
    adapter: Path
    token: str
    train_s: float
    train_steps: int
    export_bytes: int
    probes: dict[int, dict[str, Any]]
    images: dict[int, list[Image.Image]]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- the runner
class Effects:
    """Runs the parts; personalized adapters are trained once per run and shared by `steer` and `personalize`."""

    def __init__(self, settings: Settings, work: Path, figures: Path):
        self.s, self.work, self.figures = settings, work, figures
        self._adapters: dict[str, Personalized] = {}

    # -- personalization
    def personalized(self, method: str) -> Personalized:
        if method not in self._adapters:
            self._adapters[method] = self._personalize(method)
        return self._adapters[method]

    def _personalize(self, method: str) -> Personalized:
        from dreamsteer.benchmarks.toy_floors import _method_token
        from dreamsteer.train import personalize
        from dreamsteer.train.config import compose, recipe_overrides

        s = self.s
        run_dir = _fresh(self.work / "personalize" / method)
        overrides = [*recipe_overrides(s.model, method), "logger=none", f"output_dir={run_dir}", "progress=false",
                     f"data.instance_dir={run_dir / 'photos'}", "data.instance_prompt=unused", f"seed={EFFECTS_SEED}"]
        cfg = compose("personalize", overrides + ([f"trainer.max_steps={s.train_steps}"] if s.train_steps else []))
        token = _method_token(cfg)
        write_subject_photos(run_dir / "photos", s.photos, seed=EFFECTS_SEED, token=token)
        cfg.data.instance_prompt = f"a {token} {SUBJECT.class_word}"
        steps = int(cfg.trainer.max_steps)
        prompts, backgrounds = subject_prompts(token, s.per_background)
        probe = SubjectProbe(sorted({0, *(max(1, round(f * steps)) for f in s.probes)}), prompts, backgrounds, s.sample_steps, s.guidance,
                             EFFECTS_SEED)
        started = time.perf_counter()
        adapter = personalize.run(cfg, callbacks=[probe.callback])
        train_s = time.perf_counter() - started
        return Personalized(method, Path(adapter), token, train_s, steps, folder_bytes(Path(adapter)), probe.results, probe.images)

    # -- parts
    def edit(self) -> dict[str, Any]:
        s = self.s
        backbone = _load(s.model)
        work = _fresh(self.work / "edit")
        cases = [edit_case(kind, _seed("edit", k, i), f"{kind}_{i:02d}", backbone.resolution) for k, kind in enumerate(EDIT_KINDS) for i in range(s.n_edit)]
        steps = {m: _steps(m, s.step_fraction) for m in EDIT_METHODS}
        jobs = edit_jobs(cases, EDIT_METHODS, work / "sources", {m: s.editor_overrides(n) for m, n in steps.items()})
        records = run_edit_jobs(s.model, jobs, work, s.workers)
        rows = (NO_EDIT, *EDIT_METHODS)
        results: dict[str, dict[str, list[dict[str, Any]]]] = {kind: {m: [] for m in rows} for kind in EDIT_KINDS}
        cases_out, images = [], {}
        for case in cases:
            control = score_edit(case, vae_reconstruction(backbone, case.scene.image)) | {"seconds": None}
            results[case.kind][NO_EDIT].append(control)
            entry = {"id": case.id, "kind": case.kind, "source_prompt": case.scene.caption, "target_prompt": case.target_prompt,
                     "methods": {NO_EDIT: control}}
            for method in EDIT_METHODS:
                record = records[f"{method}__{case.id}"]
                image = edited_image(record)
                images[(case.id, method)] = image
                metrics = score_edit(case, image) | {"seconds": record["timings"]["edit_s"]}
                results[case.kind][method].append(metrics)
                entry["methods"][method] = metrics
            cases_out.append(entry)
        table = {kind: {m: mean_metrics(rs) | {"seconds": _mean([r["seconds"] for r in rs])} for m, rs in by.items()} for kind, by in results.items()}
        overall = {m: mean_metrics([r for kind in EDIT_KINDS for r in results[kind][m]]) | {"seconds": _mean([r["seconds"] for kind in EDIT_KINDS for r in results[kind][m]])}
                   for m in rows}
        for kind in EDIT_KINDS:
            shown = [c for c in cases if c.kind == kind][:GRID_ROWS]
            labelled_grid([[c.scene.image] + [images[(c.id, m)] for m in EDIT_METHODS] for c in shown], ["source", *EDIT_METHODS],
                          self.figures / f"edit_{kind}.png")
        return {"steps": steps, "table": table, "overall": overall,
                "claims": edit_claims(results), "cases": cases_out}

    def steer(self) -> dict[str, Any]:
        from dreamsteer.train import steer as steer_task
        from dreamsteer.train.config import compose

        s = self.s
        backbone = _load(s.model)
        work = _fresh(self.work / "steer")
        cases = [steer_case(_seed("steer", i), f"scene_{i:02d}", backbone.resolution) for i in range(s.n_steer)]
        sources = {c.id: save_image_atomic(c.scene.image, work / "sources" / f"{c.id}.png") for c in cases}
        edit_steps = {e: _steps(e, s.step_fraction) for e in STEER_EDITORS}
        jobs, steer_s, trained, steer_lr = [], {}, {}, {}

        def steered(method: str, case: EditCase, variant: str, extra: Sequence[str]) -> str:
            base = self.personalized(method)
            out = work / "steered" / method / variant / case.id
            started = time.perf_counter()
            path = steer_task.run(compose("steer", [
                f"model.pretrained={s.model}", f"adapter={base.adapter}", f"image={sources[case.id]}",
                f"source_prompt='{case.scene.caption}'", f"ref_prompt='{ref_prompt(case, base.token)}'", f"seed={EFFECTS_SEED}",
                f"output_dir={out}", "progress=false", "logger=none", *s.steering_overrides(), *extra]))
            steer_s.setdefault((method, variant), []).append(time.perf_counter() - started)
            if method not in steer_lr:  # every steering of a method runs at one rate; its steered adapter records which
                steer_lr[method] = read_manifest(path)["steering"]["lr"]
            return str(path)

        def add_jobs(method: str, case: EditCase, label: str, adapter: str, editors: Sequence[str]) -> None:
            base = self.personalized(method)
            for e in editors:
                jobs.append({"id": f"{method}__{e}__{label}__{case.id}", "image": str(sources[case.id]), "source_prompt": case.scene.caption,
                             "target_prompt": ref_prompt(case, base.token), "method": e, "seed": 0, "adapter": adapter,
                             "overrides": s.editor_overrides(edit_steps[e])})

        for method in BASELINES:
            trained[method] = self.personalized(method)
            for case in cases:
                add_jobs(method, case, "baseline", str(trained[method].adapter), STEER_EDITORS)
                add_jobs(method, case, "steered", steered(method, case, "steered", []), STEER_EDITORS)
        for variant, (_, extra) in ABLATIONS.items():
            for case in cases[: s.ablation_n]:
                add_jobs("lora", case, variant, steered("lora", case, variant, extra), ["dds_sm"])
        records = run_edit_jobs(s.model, jobs, work, s.workers)

        by_case = {c.id: c for c in cases}
        rows: dict[str, list[dict[str, Any]]] = {}
        images: dict[str, Image.Image] = {}
        for job in jobs:
            method, editor, label, case_id = job["id"].split("__")
            image = edited_image(records[job["id"]])
            images[job["id"]] = image
            metrics = score_edit(by_case[case_id], image) | {"case": case_id, "seconds": records[job["id"]]["timings"]["edit_s"]}
            rows.setdefault(f"{method}__{editor}__{label}", []).append(metrics)
        table = {key: mean_metrics(rs) for key, rs in rows.items()}
        paired = {}
        for method in BASELINES:
            for e in STEER_EDITORS:
                base, steer_rows = rows[f"{method}__{e}__baseline"], rows[f"{method}__{e}__steered"]
                paired[f"{method}__{e}"] = {"steered_higher_subject": float(np.mean([b["subject_score"] < t["subject_score"] for b, t in zip(base, steer_rows)])),
                                            "steered_lower_outside": float(np.mean([b["outside_change"] > t["outside_change"] for b, t in zip(base, steer_rows)]))}
        ablation_rows = {}
        if s.ablation_n:
            ablation_rows = {"J = -1 (default)": mean_metrics(rows["lora__dds_sm__steered"][: s.ablation_n]),
                             "no steering": mean_metrics(rows["lora__dds_sm__baseline"][: s.ablation_n])}
            ablation_rows |= {label: table[f"lora__dds_sm__{variant}"] for variant, (label, _) in ABLATIONS.items()}
        for method in BASELINES:
            shown = cases[:GRID_ROWS]
            labelled_grid([[c.scene.image] + [images[f"{method}__{e}__{label}__{c.id}"] for e in STEER_EDITORS for label in ("baseline", "steered")]
                           for c in shown], ["source", "DDS-S", "DDS-S st.", "DDS-SM", "DDS-SM st."], self.figures / f"steer_{method}.png")
        return {"edit_steps": edit_steps, "steer_overrides": list(s.steering_overrides()), "ablation_n": s.ablation_n, "ablations": ABLATIONS,
                "table": table, "paired": paired, "ablation_table": ablation_rows,
                "steer_seconds": {f"{m}__{v}": _mean(t) for (m, v), t in steer_s.items()},
                "adapters": {m: {"token": p.token, "train_steps": p.train_steps, "train_s": round(p.train_s, 1), "steer_lr": steer_lr[m]}
                             for m, p in trained.items()},
                "cases": {key: rs for key, rs in rows.items()},
                "prompts": {c.id: {"source": c.scene.caption, "ref": c.target_prompt} for c in cases}}

    def reground(self) -> dict[str, Any]:
        from dreamsteer.diffusion.reground import grounded_sample

        s = self.s
        backbone = _load(s.gligen_model)
        resolution = backbone.resolution
        cases = [render(*_two_objects(_seed("reground", i), resolution)) for i in range(s.n_reground)]
        table: dict[str, dict[str, Any]] = {}
        records: list[dict[str, Any]] = []
        shown: dict[tuple[float, str], list[Image.Image]] = {}
        for beta in REGROUND_BETAS:
            for wiring in WIRINGS:
                spatial, textual, both = [], [], []
                started = time.perf_counter()
                for i, scene in enumerate(cases):
                    grounded, free = scene.objects
                    box = (scene.boxes[0] / resolution).tolist()
                    latents = grounded_sample(backbone, scene.caption, [grounded.phrase], [box], wiring, beta, s.sample_steps,
                                              torch.Generator().manual_seed(EFFECTS_SEED + i), guidance_scale=s.guidance)
                    with torch.no_grad():
                        image = tensor_to_pil(backbone.decode(latents)[0].float().clamp(-1, 1))
                    detection = detect(image)
                    hit = in_box(detection, grounded.color, grounded.shape, scene.boxes[0])
                    present = any((o.color, o.shape) == (free.color, free.shape) for o in detection.objects)
                    spatial.append(hit)
                    textual.append(present)
                    both.append(hit and present)
                    records.append({"beta": beta, "wiring": wiring, "caption": scene.caption, "grounded": grounded.phrase, "box": box,
                                    "spatial": hit, "textual": present, "detection": summary(detection)})
                    if i < GRID_ROWS * 2:
                        shown.setdefault((beta, wiring), []).append(_outline(image, scene.boxes[0]))
                table[f"{beta:g}__{wiring}"] = {"beta": beta, "wiring": wiring, "spatial": float(np.mean(spatial)), "textual": float(np.mean(textual)),
                                                "both": float(np.mean(both)), "n": len(cases),
                                                "seconds_per_image": (time.perf_counter() - started) / len(cases)}
        header = [f"b={b:g} {w[:3]}" for b in REGROUND_BETAS for w in WIRINGS]
        columns = [shown[(b, w)] for b in REGROUND_BETAS for w in WIRINGS]
        labelled_grid([[_outline(c.image, c.boxes[0])] + [col[r] for col in columns] for r, c in enumerate(cases[: GRID_ROWS * 2])],
                      ["truth", *header], self.figures / "reground.png")
        return {"betas": list(REGROUND_BETAS), "steps": s.sample_steps, "guidance": s.guidance, "weights": _weights_id(s.gligen_model),
                "table": table, "cases": records}

    def personalize(self) -> dict[str, Any]:
        s = self.s
        base = _load(s.model)
        from dreamsteer.benchmarks.toy_floors import sample_images

        prompts, backgrounds = subject_prompts(SUBJECT.token, s.per_background)
        base_images = sample_images(base, prompts, [EFFECTS_SEED + i for i in range(len(prompts))], s.sample_steps, s.guidance)
        out: dict[str, Any] = {"base": subject_readings(base_images, backgrounds), "methods": {}}
        rows = [base_images[:: s.per_background]]
        labels = ["base"]
        for method in BASELINES:
            p = self.personalized(method)
            out["methods"][method] = {"token": p.token, "train_steps": p.train_steps, "train_s": round(p.train_s, 1),
                                      "export_bytes": p.export_bytes, "probes": {str(k): v for k, v in sorted(p.probes.items())}}
            final = p.images[max(p.images)]
            rows.append(final[:: s.per_background])
            labels.append(method[:10])
        labelled_grid(rows, list(BACKGROUND_COLORS), self.figures / "personalize.png", labels)
        return out


def edit_claims(results: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """LUSD's localization claim (less change outside the edited objects than DDS and CDS) and
    Ground-A-Score's multi-attribute claim (the two-color edits succeed where DDS drops an attribute),
    with paired per-case comparisons."""
    every = {m: [r for kind in EDIT_KINDS for r in results[kind][m]] for m in ("lusd", "dds", "cds")}
    lusd = {}
    for other in ("dds", "cds"):
        pairs = list(zip(every["lusd"], every[other]))
        lusd[other] = {"lusd_outside": _mean([a["outside_change"] for a, _ in pairs]), "other_outside": _mean([b["outside_change"] for _, b in pairs]),
                       "lusd_lower_fraction": float(np.mean([a["outside_change"] < b["outside_change"] for a, b in pairs])),
                       "lusd_others_kept": _mean([a["others_kept"] for a, _ in pairs]), "other_others_kept": _mean([b["others_kept"] for _, b in pairs])}
    lusd["holds"] = all(lusd[o]["lusd_lower_fraction"] > 0.5 for o in ("dds", "cds"))
    gas, dds = results["two_colors"]["ground_a_score"], results["two_colors"]["dds"]
    multi = {"gas_success": _mean([r["success"] for r in gas]), "dds_success": _mean([r["success"] for r in dds]),
             "gas_targets_hit": _mean([r["targets_hit"] for r in gas]), "dds_targets_hit": _mean([r["targets_hit"] for r in dds]),
             "dds_dropped_one": float(np.mean([r["targets_hit"] == 0.5 for r in dds])), "gas_dropped_one": float(np.mean([r["targets_hit"] == 0.5 for r in gas]))}
    multi["holds"] = multi["gas_targets_hit"] > multi["dds_targets_hit"]
    return {"lusd_localization": lusd, "gas_multi_attribute": multi}


# ----------------------------------------------------------------------------- cases
def steer_case(seed: Sequence[int], case_id: str, resolution: int) -> EditCase:
    """A source scene whose first object is a circle (not of the subject's color) and whose other object, if
    any, is not a circle; the target makes the circle the subject."""
    rng = np.random.default_rng(seed)
    background = str(rng.choice(list(BACKGROUND_COLORS)))
    objects = sample_objects(rng, int(rng.integers(1, 3)))
    objects[0] = replace(objects[0], shape=SUBJECT.shape, color=str(rng.choice([c for c in OBJECT_COLORS if c != SUBJECT.color])))
    objects[1:] = [replace(o, shape=str(rng.choice([s for s in SHAPES if s != SUBJECT.shape]))) for o in objects[1:]]
    scene = render(background, objects, resolution)
    return EditCase(case_id, "subject", scene, [replace(objects[0], color=SUBJECT.color, inner_color=SUBJECT.inner_color), *objects[1:]])


def ref_prompt(case: EditCase, token: str) -> str:
    """The steer / edit target prompt naming the subject by the adapter's `token`."""
    return case.target_prompt.replace(f"{SUBJECT.token} {SUBJECT.class_word}", f"{token} {SUBJECT.class_word}", 1)


def _two_objects(seed: Sequence[int], resolution: int) -> tuple[str, list[SceneObject], int]:
    rng = np.random.default_rng(seed)
    background = str(rng.choice(list(BACKGROUND_COLORS)))
    return background, sample_objects(rng, 2), resolution


def _outline(image: Image.Image, box: Sequence[int]) -> Image.Image:
    """The image enlarged to `PANEL` pixels with the grounding box drawn in black and white."""
    big = image.convert("RGB").resize((PANEL, PANEL), Image.Resampling.NEAREST)
    f = PANEL / image.size[0]
    x0, y0, x1, y1 = (float(v) * f for v in box)
    ImageDraw.Draw(big).rectangle([x0, y0, x1 - 1, y1 - 1], outline="black")
    return big


# ----------------------------------------------------------------------------- the report
def _f(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:.{digits}f}"


def _holds(flag: bool) -> str:
    return "**holds**" if flag else "**does not hold**"


def _guidance_flag(st: dict[str, Any]) -> str:
    """The command-line flag of a run's `editor_guidance` ("" when each editor kept its own)."""
    return f" --editor-guidance {st['editor_guidance']:g}" if st.get("editor_guidance") is not None else ""


def _edit_md(r: dict[str, Any], figures: str) -> list[str]:
    st = r["settings"]
    lines = [
        f"Command: `python -m dreamsteer.benchmarks.effects --part edit --n {st['n_edit']}{_guidance_flag(st)}` ({_f(r['seconds'], 0)} s).",
        *([] if _guidance_flag(st) else [
            "", "Every editor here runs at its reference guidance of 7.5, which over-drives the toy model (`docs/toy.md`, \"Editing recipe\"); "
            "the same part with every editor at the toy model's DDS guidance of 1.5 is [effects_guidance.md](effects_guidance.md)."]),
        "",
        f"{st['n_edit']} rendered source scenes per edit kind (seeds `({EFFECTS_SEED}, 1, kind, i)`, 1-2 objects; `two_colors`: 2 objects): "
        "`color` gives one object another color, `shape` another shape, `two_colors` both objects other colors (the multi-attribute edit). "
        "Each method runs its reference defaults (`conf/editor/<method>.yaml`"
        + (f"; every editor's guidance set to {st['editor_guidance']:g}" if st.get("editor_guidance") is not None else "") + ") at "
        f"{st['step_fraction']:g} of its default step count through `train edit` (job seed = the case's index within its kind, i); Ground-A-Score gets one subtask per "
        "edited object (source and target phrase, the object's box grown by 2 px). Steps: "
        + ", ".join(f"{m} {n}" for m, n in r["steps"].items()) + ".",
        "",
        "Metrics (`metrics/toy_edit.py`, by the detector of `metrics/detector.py`): **success** = the detector reads the target scene "
        "(source background and object count, every object at its place — mask IoU >= 0.5 with its source mask — with its target color "
        "and shape); **targets** = fraction of edited objects holding their target; **others kept** / **bg kept** = unedited objects keep "
        "color and shape / the background keeps its color; **outside** = mean absolute change (8-bit RGB) outside the edited objects' masks "
        "dilated by 2 px; **box IoU** = the edited object's detected box vs its source box; "
        "**s/edit** = the edit's wall time (model load excluded). The row **vae only** scores the source encoded and decoded, an edit "
        "that does nothing: its success is what the detector grants without an edit (e.g. a VAE-blurred star read as the target circle), "
        "its outside change the floor no latent editor can go below.",
        "",
    ]
    header = "| method | success | targets | others kept | bg kept | outside | box IoU | s/edit |\n|---|---|---|---|---|---|---|---|"
    for kind, rows in [*r["table"].items(), ("all kinds", r["overall"])]:
        lines += [f"**{kind}** (n = {next(iter(rows.values()))['n']} per method)", "", header]
        for m, a in rows.items():
            lines.append(f"| {m} | {_f(a['success'])} | {_f(a['targets_hit'])} | {_f(a['others_kept'])} | {_f(a['background_kept'])} | "
                         f"{_f(a['outside_change'], 1)} | {_f(a['box_iou'])} | {_f(a['seconds'], 1)} |")
        lines.append("")
    lusd, multi = r["claims"]["lusd_localization"], r["claims"]["gas_multi_attribute"]
    gas2, dds2 = r["table"]["two_colors"]["ground_a_score"], r["table"]["two_colors"]["dds"]
    lines += [
        "**LUSD's claim** (better localization than DDS and CDS: less change outside the edited object) "
        f"{_holds(lusd['holds'])} here: mean change outside, all kinds, LUSD {_f(lusd['dds']['lusd_outside'], 1)} vs DDS "
        f"{_f(lusd['dds']['other_outside'], 1)} vs CDS {_f(lusd['cds']['other_outside'], 1)}; LUSD changes less than DDS in "
        f"{_f(100 * lusd['dds']['lusd_lower_fraction'], 0)}% of the cases and less than CDS in {_f(100 * lusd['cds']['lusd_lower_fraction'], 0)}% "
        f"(the claim counted as holding when both are above 50%); other objects kept: LUSD {_f(lusd['dds']['lusd_others_kept'])}, "
        f"DDS {_f(lusd['dds']['other_others_kept'])}, CDS {_f(lusd['cds']['other_others_kept'])}.",
        "",
        "**Ground-A-Score's claim** (multi-attribute edits succeed where plain DDS drops attributes) "
        f"{_holds(multi['holds'])} here (counted as holding when Ground-A-Score hits more of the targets than DDS): on `two_colors`, "
        f"success Ground-A-Score {_f(multi['gas_success'])} vs DDS {_f(multi['dds_success'])}; targets hit {_f(multi['gas_targets_hit'])} vs "
        f"{_f(multi['dds_targets_hit'])}; edits that got exactly one of the two colors: {_f(multi['gas_dropped_one'])} vs {_f(multi['dds_dropped_one'])}; "
        f"preservation: change outside {_f(gas2['outside_change'], 1)} vs {_f(dds2['outside_change'], 1)}, background kept "
        f"{_f(gas2['background_kept'])} vs {_f(dds2['background_kept'])}.",
        "",
    ]
    lines += [f"![{kind} edits]({figures}/edit_{kind}.png)" for kind in r["table"]] + [""]
    return lines


def _steer_md(r: dict[str, Any], figures: str) -> list[str]:
    st = r["settings"]
    names = {"dds_s": "DDS-S", "dds_sm": "DDS-SM"}
    rates = ""  # the rates the steered adapters record (runs before 2026-12-02 recorded none)
    if all("steer_lr" in a for a in r["adapters"].values()):
        rates = "; steering learning rates: " + ", ".join(f"{m} {a['steer_lr']:g}" for m, a in r["adapters"].items())
    lines = [
        f"Command: `python -m dreamsteer.benchmarks.effects --part steer --n {st['n_steer']}{_guidance_flag(st)}` "
        f"({_f(r['seconds'], 0)} s; the four adapters "
        "are trained once per run, in whichever of `steer` and `personalize` runs first).",
        "",
        f"Each baseline is trained with the model's recipe where it has one (`train personalize experiment=toy_<m>`, "
        "`conf/experiment/`), else the method's defaults (`method=<m>`; "
        + ", ".join(f"{m} {a['train_steps']} steps" for m, a in r["adapters"].items())
        + f") on {st['photos']} rendered photos of the subject with their captions. {st['n_steer']} source scenes (seeds `({EFFECTS_SEED}, 2, i)`): "
        "a circle of a non-blue color, and in some scenes a second object that is not a circle. The circle is edited into the subject "
        "(target prompt: the caption with the circle named `<token> circle`) with "
        + ", ".join(f"{names[e]} ({n} steps)" for e, n in r["edit_steps"].items())
        + (f" at guidance {st['editor_guidance']:g}" if st.get("editor_guidance") is not None else "")
        + ", once with the baseline adapter and once with the adapter steered toward that scene by `train steer` (its defaults: 10 steps, J = -1, "
        f"subject mask on, the learning rate the adapter was trained with; with `{' '.join(r['steer_overrides'])}`"
        + rates + "). **subject** = subject score at the circle's place (detector, 0..1; >= 0.5 is "
        "the subject); **success** = the detector reads the target scene (the subject at the circle's place, the other object and the "
        "background kept); **outside** = mean absolute change outside the circle's mask (+2 px); **box IoU** = the edited object's box vs the "
        "circle's. No local image encoder exists here, so subject fidelity is the detector's subject score (no CLIP-I).",
        "",
        "| baseline | editor | adapter | subject | success | outside | box IoU | others kept | bg kept | steered scores higher | steered changes less outside |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in BASELINES:
        for e in names:
            for label in ("baseline", "steered"):
                a = r["table"][f"{method}__{e}__{label}"]
                pair = r["paired"][f"{method}__{e}"] if label == "steered" else {}
                lines.append(f"| {method} | {names[e]} | {label} | {_f(a['subject_score'])} | {_f(a['success'])} | {_f(a['outside_change'], 1)} | "
                             f"{_f(a['box_iou'])} | {_f(a['others_kept'])} | {_f(a['background_kept'])} | "
                             f"{_f(pair.get('steered_higher_subject'))} | {_f(pair.get('steered_lower_outside'))} |")
    better = [f"{m} {names[e]}" for m in BASELINES for e in names
              if (r["table"][f"{m}__{e}__steered"]["subject_score"] or 0) > (r["table"][f"{m}__{e}__baseline"]["subject_score"] or 0)]
    if max((a["subject_score"] or 0) for a in r["table"].values()) == 0:
        lines += ["", "**No edit produced the subject** (subject score 0 everywhere): none of the four adapters learned the subject "
                  "on this model with its default recipe (see Personalization), so DreamSteerer's subject-fidelity claim cannot be "
                  "tested here; the table only compares structure preservation with and without steering."]
    lines += ["", "The paper's claim (steering raises subject fidelity and keeps the structure) — subject score higher with steering for: "
              + (", ".join(better) if better else "**none**") + f" (of {2 * len(BASELINES)} baseline x editor pairs); the columns above say where "
              "structure was kept.", "",
              f"**Ablations** (LoRA, DDS-SM, the first {r['ablation_n']} scenes only — a smaller n, read as indicative): steering variants against "
              "the default (J = -1, mode shifting on, subject mask on, 10 steps) and against no steering.", "",
              "| variant | subject | success | outside | box IoU |", "|---|---|---|---|---|"]
    for variant, a in r["ablation_table"].items():
        lines.append(f"| {variant} | {_f(a['subject_score'])} | {_f(a['success'])} | {_f(a['outside_change'], 1)} | {_f(a['box_iou'])} |")
    lines += [""] + [f"![{m}]({figures}/steer_{m}.png)" for m in BASELINES] + [""]
    return lines


def _reground_md(r: dict[str, Any], figures: str) -> list[str]:
    st = r["settings"]
    lines = [
        f"Command: `python -m dreamsteer.benchmarks.effects --part reground --n {st['n_reground']}` ({_f(r['seconds'], 0)} s).",
        "",
        f"`{st['gligen_model']}` (weights sha256 `{r['weights']}`); {st['n_reground']} captions naming two objects (seeds `({EFFECTS_SEED}, 3, i)`), of which only the first is grounded (its phrase and its "
        f"rendered box); DDIM {r['steps']} steps, CFG {r['guidance']:g}, the same noise for both wirings. **spatial** = the grounded object "
        "(its color and shape) is detected with box IoU >= 0.5 with its box; **textual** = the ungrounded object (its color and shape) is "
        "detected anywhere; **both** = both in one image.",
        "",
        "| beta | wiring | spatial | textual | both | s/image |", "|---|---|---|---|---|---|",
    ]
    for a in r["table"].values():
        lines.append(f"| {a['beta']:g} | {a['wiring']} | {_f(a['spatial'])} | {_f(a['textual'])} | {_f(a['both'])} | {_f(a['seconds_per_image'], 2)} |")
    keeps = [b for b in r["betas"] if r["table"][f"{b:g}__parallel"]["textual"] >= r["table"][f"{b:g}__sequential"]["textual"]]
    lines += ["", f"ReGround's claim (the parallel wiring keeps the ungrounded objects of the caption at least as often, at similar spatial "
              f"grounding): parallel >= sequential in textual grounding at beta {', '.join(f'{b:g}' for b in keeps) or 'none'} of "
              f"{', '.join(f'{b:g}' for b in r['betas'])}.", "", f"![reground]({figures}/reground.png)", ""]
    return lines


def _personalize_md(r: dict[str, Any], figures: str) -> list[str]:
    st = r["settings"]
    base = r["base"]
    lines = [
        f"Command: `python -m dreamsteer.benchmarks.effects --part personalize` ({_f(r['seconds'], 0)} s; the adapters are trained once "
        "per run, in whichever of `steer` and `personalize` runs first: the train s column is each method's training).",
        "",
        f"Each method's recipe (as in the DreamSteerer part) on {st['photos']} rendered subject photos with captions; at the listed steps "
        f"(step 0: the initialized adapter, on its recipe's pivot words where it has a pivot stage; the train s column includes "
        f"the stage) {st['per_background']} samples per background of \"a <token> circle on a <bg> background\" "
        f"(DDIM {st['sample_steps']} steps, CFG {st['guidance']:g}). **subject** = rate of samples where the detector finds the subject; "
        "**score** = mean subject score; **bg kept** = the sample's background is the prompt's (base-prompt preservation). "
        f"Base model with `sks`: subject {_f(base['subject_rate'])}, score {_f(base['subject_score'])}, bg kept {_f(base['background_kept'])}.",
        "",
        "| method | step | subject | score | bg kept | export size | train s |", "|---|---|---|---|---|---|---|",
    ]
    for method, a in r["methods"].items():
        for step, p in a["probes"].items():
            final = int(step) == a["train_steps"]
            size = f"{a['export_bytes'] / 1e6:.2f} MB" if final else ""
            lines.append(f"| {method} | {step} | {_f(p['subject_rate'])} | {_f(p['subject_score'])} | {_f(p['background_kept'])} | {size} | "
                         f"{_f(a['train_s'], 0) if final else ''} |")
    finals = {m: a["probes"][str(a["train_steps"])]["subject_rate"] for m, a in r["methods"].items() if str(a["train_steps"]) in a["probes"]}
    if finals and max(finals.values()) == 0:
        lines += ["", "**No method learned the subject** with its default recipe on this model: no sample of any method shows it "
                  "(the detector's subject score stays 0: the yellow inner disc never appears), so the fidelity-vs-steps curves are flat "
                  "at 0; the backgrounds of the prompts are kept."]
    lines += ["", f"![personalization]({figures}/personalize.png)", ""]
    return lines


REGROUND_SKIPPED = ("ReGround's claim is not measured: it needs a GLIGEN model of the toy world, the shipped `toy-gligen` "
                    "(`diffusion/builtin/toy-gligen`, recipe in `docs/toy.md`) or any GLIGEN diffusers folder of the toy world "
                    "given as `--gligen-model <folder>`, and the one asked for could not be loaded.")


DEFAULT_FILES = {"md": Path("docs") / "effects.md", "json": Path("docs") / "effects.json", "figures": Path("docs") / "effects"}
SECTIONS: dict[str, tuple[str, Callable[[dict[str, Any], str], list[str]]]] = {
    "edit": ("Editing: SDS, DDS, CDS, SBP, PDS, LUSD, Ground-A-Score", _edit_md),
    "steer": ("DreamSteerer: steering each baseline toward the source", _steer_md),
    "reground": ("ReGround: sequential vs parallel wiring", _reground_md),
    "personalize": ("Personalization: subject fidelity vs steps, prompt preservation, export size", _personalize_md),
}


def render_markdown(results: dict[str, Any], figures: str = "effects", numbers: str = "effects.json",
                    weights_now: dict[str, str] | None = None) -> str:
    """The markdown of `results`; `figures` (the figures' folder) and `numbers` (the JSON) as linked from the markdown's folder.
    `weights_now` (part -> the sha256 its model's weights have now) marks the parts measured on other weights."""
    weights_now = weights_now or {}
    lines = [
        "# The papers' claims in miniature: measured effects on the toy world",
        "",
        "Every method of the project run on the toy world (`docs/toy.md`), seeded, scored by the toy detector; generated by "
        f"`python -m dreamsteer.benchmarks.effects` (`benchmarks/effects.py`), every number in [{numbers}]({numbers}). "
        "Where a paper's claim does not hold here, the text says so; nothing was tuned to make a table look like a paper. "
        "The toy model is a small model of a 32-pixel world trained on a CPU (which of its floors it meets is in "
        "`docs/toy.md`): "
        "these numbers say what each method does on this world, not how well it works on Stable Diffusion. Small n: "
        "a difference of one or two cases is noise.",
        "",
        "| part | status | weights (sha256) | wall time | CPU time | n (cases per kind / scenes / captions / photos) |",
        "|---|---|---|---|---|---|",
    ]
    stale = []
    for part in PARTS:
        r = results.get("parts", {}).get(part)
        if r is None:
            lines.append(f"| {part} | not run | | | | |")
        elif "skipped" in r:
            lines.append(f"| {part} | skipped: {r['skipped']} | | | | |")
        else:
            n = r["settings"].get(f"n_{part}", r["settings"]["photos"])
            weights = r.get("weights", "?")
            if part in weights_now and weights != weights_now[part]:
                stale.append(part)
                weights = f"{weights}: **not the model's weights now** ({weights_now[part]})"
            lines.append(f"| {part} | measured {r.get('finished', '')} | {weights} | {_f(r['seconds'], 0)} s | "
                         f"{_f(r.get('cpu_seconds'), 0)} s | {n} |")
    machine = results.get("machine", {})
    lines += ["", f"Model: `{results.get('model', 'toy')}` (weights sha256 `{results.get('weights', '?')}`); machine: "
              f"{machine.get('cpus', '?')} CPU cores, load average {machine.get('load', '?')} at the start of the last run. "
              "Wall times are those of that machine (on a shared CPU they are inflated); CPU time is the user + system time of "
              "the benchmark and its worker processes, one thread each: on an idle 2-core CPU a part takes about its CPU time, "
              "the edit jobs half of it with `--workers 2`."]
    files = results.get("files", {})
    flags = " ".join(f"--{key} {files[key]}" for key in ("md", "json", "figures") if files.get(key) not in (None, str(DEFAULT_FILES[key])))
    if flags:
        lines += ["", f"This page and its numbers and figures were written with `{flags}`: add them to each command below, which "
                  "would otherwise write `docs/effects.md`."]
    if stale:
        lines += ["", f"**Measured on earlier weights**: {', '.join(stale)}. Such a part says what those weights did, not what the "
                  "model does now; `--part " + " ".join(stale) + "` measures it again."]
    lines += [""]
    for part, (title, render_part) in SECTIONS.items():
        r = results.get("parts", {}).get(part)
        lines += [f"## {title}", ""]
        if r is None:
            lines += ["Not run yet.", ""]
        elif "skipped" in r:
            lines += [f"Skipped: {r['skipped']}", ""] + ([REGROUND_SKIPPED, ""] if part == "reground" else [])
        else:
            lines += render_part(r, figures)
    return "\n".join(lines)


def _weights_id(model: str) -> str:
    import hashlib

    from dreamsteer.diffusion.backbone import ModelLoadError
    from dreamsteer.diffusion.toy import builtin_model_dir

    try:
        digest = hashlib.sha256()
        for path in sorted(builtin_model_dir(model).rglob("*.safetensors")):  # every component: the UNet, the VAE, the text encoder
            digest.update(path.read_bytes())
        return digest.hexdigest()[:12]
    except (OSError, ModelLoadError):
        return "not a built-in model"


def run(parts: Sequence[str], settings: Settings, md: Path, json_path: Path, figures: Path, work: Path) -> dict[str, Any]:
    """Run `parts`, merge them into the results in `json_path` (other parts are kept; parts may run in separate
    processes at the same time), write the JSON and the markdown; returns the merged results."""
    torch.set_num_threads(1)
    work = work.resolve()  # edit manifests name sources and adapters by absolute paths
    results: dict[str, Any] = {"parts": {}}
    results["model"] = settings.model
    results["weights"] = _weights_id(settings.model)
    results["files"] = {"md": str(md), "json": str(json_path), "figures": str(figures)}
    results["machine"] = {"cpus": os.cpu_count(), "load": round(os.getloadavg()[0], 1)}
    figures.mkdir(parents=True, exist_ok=True)
    effects = Effects(settings, work, figures)
    for part in parts:
        started, cpu = time.perf_counter(), _cpu_seconds()
        try:
            result = getattr(effects, part)()
        except PartSkipped as err:
            results["parts"][part] = {"skipped": str(err)}
            print(f"{part}: skipped ({err})")
            continue
        result["seconds"] = round(time.perf_counter() - started, 1)
        result["cpu_seconds"] = round(_cpu_seconds() - cpu, 1)
        result["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        result["settings"] = asdict(settings)
        result.setdefault("weights", results["weights"])  # reground's are its GLIGEN model's
        results["parts"][part] = result
        print(f"{part}: {result['seconds']:.0f} s")
        results = _merge(json_path, results, part)  # a later part's failure keeps this one
    results = _merge(json_path, results)
    gligen_weights = _weights_id(settings.gligen_model)
    weights_now = {part: gligen_weights if part == "reground" else results["weights"] for part in PARTS}
    write_text_atomic(render_markdown(results, _link(figures, md), _link(json_path, md), weights_now) + "\n", md)
    return results


def _link(path: Path, md: Path) -> str:
    """`path` as the markdown file `md` links it (relative to its folder)."""
    return Path(os.path.relpath(path.resolve(), md.resolve().parent)).as_posix()


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its finished child processes (the edit task's workers)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _merge(json_path: Path, results: dict[str, Any], part: str | None = None) -> dict[str, Any]:
    """Write `results` (only `part` of its parts, or the parts it holds) over the parts in `json_path` as it is
    now, so that parts run by separate processes at the same time all land; returns what was written."""
    current = json.loads(json_path.read_text(encoding="utf-8")) if json_path.is_file() else {}
    for earlier in current.get("parts", {}).values():  # a part written before parts recorded their weights: the file's
        if "skipped" not in earlier:
            earlier.setdefault("weights", current.get("weights", "?"))
    merged = {**current, **{k: v for k, v in results.items() if k != "parts"}}
    merged["parts"] = {**current.get("parts", {}), **({part: results["parts"][part]} if part else results["parts"])}
    write_json_atomic(merged, json_path)
    return merged


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", nargs="+", choices=(*PARTS, "all"), default=["all"])
    defaults = Settings()
    parser.add_argument("--n", type=int, default=None, help=f"cases of every part: edit per kind ({defaults.n_edit}), steer scenes "
                        f"({defaults.n_steer}), reground captions ({defaults.n_reground})")
    parser.add_argument("--ablation-n", type=int, default=defaults.ablation_n, help="steer ablations: scenes (the first ones; at most --n)")
    parser.add_argument("--step-fraction", type=float, default=defaults.step_fraction, help="editors run this fraction of their default steps")
    parser.add_argument("--train-steps", type=int, default=None, help="personalization steps (default: each recipe's)")
    parser.add_argument("--per-background", type=int, default=defaults.per_background)
    parser.add_argument("--workers", type=int, default=defaults.workers, help="edit-task processes")
    parser.add_argument("--editor-guidance", type=float, default=None, help="edit and steer parts: every editor's guidance, and the steering's DDS-S direction's (default: each one's own)")
    parser.add_argument("--model", default=defaults.model)
    parser.add_argument("--gligen-model", default=defaults.gligen_model)
    parser.add_argument("--md", type=Path, default=DEFAULT_FILES["md"])
    parser.add_argument("--json", type=Path, default=DEFAULT_FILES["json"])
    parser.add_argument("--figures", type=Path, default=DEFAULT_FILES["figures"])
    parser.add_argument("--work", type=Path, default=Path("outputs") / "effects", help="intermediate files (replaced per part)")
    args = parser.parse_args(argv)
    if (args.n is not None and args.n < 1) or args.ablation_n < 0 or args.workers < 1 or args.per_background < 1 or not 0 < args.step_fraction <= 1:
        parser.error("need --n >= 1, --ablation-n >= 0, --workers >= 1, --per-background >= 1, 0 < --step-fraction <= 1")
    parts = PARTS if "all" in args.part else tuple(dict.fromkeys(args.part))
    n = {"n_edit": args.n, "n_steer": args.n, "n_reground": args.n} if args.n else {}
    settings = Settings(model=args.model, gligen_model=args.gligen_model, step_fraction=args.step_fraction, train_steps=args.train_steps,
                        per_background=args.per_background, workers=args.workers, editor_guidance=args.editor_guidance, **n)
    settings.ablation_n = min(args.ablation_n, settings.n_steer)
    run(parts, settings, args.md, args.json, args.figures, args.work)
    print(f"wrote {args.md}, {args.json}, {args.figures}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
