"""Performance at SD-1.5 scale (issue 17): our CLI and editor vs diffusers' scripts and the raw UNet.

    python -m dreamsteer.benchmarks.gpu_sd15 [--small] [--peer-dir <diffusers>/examples/dreambooth] [--out DIR]
        [--sections personalize,editor,steer,options] [--budget-s 420] [--work DIR]

Builds an SD-1.5-shaped pipeline with random weights as a local diffusers folder (UNet 320/640/1280/1280 with
cross-attention 768, a 12-layer 768-wide CLIP text encoder, the SD VAE; the tokenizer of the tiny model's
offline vocabulary); ``--small`` shrinks widths, depth and resolution (128 px) so the whole run fits a CPU.
Every measurement runs in its own process:

- ``personalize``: LoRA and DreamBooth through our CLI (``python -m dreamsteer.train personalize``; on CUDA
  ``trainer=gpu`` = bf16-mixed with frozen weights bf16, and fp16 as in the ``sd15`` preset; on CPU fp32)
  vs diffusers' ``train_dreambooth_lora.py`` / ``train_dreambooth.py`` from ``--peer-dir`` (never vendored)
  with the same model folder, photos, resolution, batch, steps, rank, lr and ``--mixed_precision=bf16``.
  Both run under the same tracer (``--trace``): the wall time after every optimizer step (a global
  ``torch.optim`` step hook; CUDA synchronized), and the process's peak memory. Seconds per step: median of
  the step-to-step intervals after `warmup` steps.
- ``editor``: one iteration of each editor method (``Editor.iteration``; fp16 on CUDA, fp32 on CPU) vs one raw
  batched UNet forward of as many rows as the iteration predicts; Ground-A-Score aggregated vs sequential; LUSD
  vs plain DDS (time and peak memory of one iteration above the loaded model).
- ``steer``: DreamSteerer's wall time and peak memory per baseline (LoRA, DreamBooth), against one
  personalization step of the same baseline (``benchmarks.steer``; fp16 on CUDA).
- ``options``: our LoRA with each speed option of ``conf/personalize.yaml`` flipped (latent caching,
  ``torch.compile``), against the default; options the config does not have are reported as skipped.

Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the peak RSS (of the whole process for the
personalize rows, above the loaded model for the editor and steer rows). Results go to ``<out>/results.json``
and ``<out>/results.md`` after every row, so a run cut at a time limit keeps what it measured.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from dreamsteer.data.files import write_json_atomic, write_text_atomic

PROMPT = "a photo of sks cat"
PEER_SCRIPTS = {"lora": "train_dreambooth_lora.py", "dreambooth": "train_dreambooth.py"}
LR = {"lora": 1e-4, "dreambooth": 5e-6}
RANK = 4
EDITOR_METHODS = ("sds", "dds", "dds_s", "dds_sm", "cds", "sbp", "pds", "lusd", "ground_a_score")
SPEED_OPTIONS = ("cache.latents", "compile.unet")  # keys of conf/personalize.yaml (added by the trainer work)
SECTIONS = ("personalize", "editor", "steer", "options")


@dataclass(frozen=True)
class Scale:
    """The model's shape and the run's lengths."""

    unet_channels: tuple[int, ...]
    unet_layers: int
    text_width: int
    text_layers: int
    text_heads: int
    vae_channels: tuple[int, ...]
    vae_layers: int
    latent: int  # latent side; images are 8x this
    warmup: int  # steps / iterations discarded before timing
    steps: int  # timed steps / iterations
    steer: tuple[int, int, int]  # EDSD steps, mode-shifting images, their sampling steps


FULL = Scale((320, 640, 1280, 1280), 2, 768, 12, 12, (128, 256, 512, 512), 2, 64, warmup=5, steps=15, steer=(10, 4, 25))
SMALL = Scale((32, 64, 64, 64), 1, 64, 2, 2, (32, 32, 64, 64), 1, 16, warmup=1, steps=3, steer=(2, 1, 2))


# ----------------------------------------------------------------------------- the model
def build_model(directory: Path, scale: Scale, device: str) -> Path:
    """An SD-1.5-shaped StableDiffusionPipeline with random weights (seed 0) saved as a diffusers folder."""
    import tempfile

    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from dreamsteer.diffusion.tiny import write_tiny_tokenizer_files

    if (directory / "model_index.json").is_file():
        return directory
    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_tokenizer_files(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=77)
    torch.manual_seed(0)
    with torch.device(device):  # random init of 860M parameters is much faster on the GPU
        unet = UNet2DConditionModel(
            sample_size=scale.latent, in_channels=4, out_channels=4, layers_per_block=scale.unet_layers,
            block_out_channels=scale.unet_channels, cross_attention_dim=scale.text_width, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=scale.vae_channels,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=scale.vae_layers, sample_size=scale.latent * 8,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=scale.text_width, intermediate_size=4 * scale.text_width,
            num_hidden_layers=scale.text_layers, num_attention_heads=scale.text_heads, max_position_embeddings=77,
            hidden_act="quick_gelu", projection_dim=scale.text_width, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    tmp_dir = directory.with_name(directory.name + ".partial")
    pipe.to("cpu").save_pretrained(str(tmp_dir), safe_serialization=True)
    tmp_dir.rename(directory)
    return directory


# ----------------------------------------------------------------------------- measuring helpers
def peak_bytes() -> int:
    """This process's peak memory: the CUDA allocator's peak, else the peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def seconds_per_step(step_ends: list[float], warmup: int) -> float:
    """Median interval between consecutive optimizer steps, the first `warmup` steps left out."""
    intervals = [b - a for a, b in zip(step_ends, step_ends[1:])][warmup:]
    if not intervals:
        raise ValueError(f"{len(step_ends)} optimizer steps recorded: too few for {warmup} warm-up steps and one timed")
    return statistics.median(intervals)


def trace(record: Path, target: list[str]) -> None:
    """Run `target` (``-m module args...`` or ``script.py args...``) as ``__main__`` in this process and
    write ``{"step_end_s": [...], "peak_bytes": n, "exit": code}`` to `record` when it ends.

    The wall time is taken after every optimizer step (``torch.optim`` global post-hook, after a CUDA
    synchronize), the same way for our CLI and for the peer scripts."""
    import runpy
    import signal

    from torch.optim.optimizer import register_optimizer_step_post_hook

    ends: list[float] = []
    cuda = torch.cuda.is_available()

    def after_step(*_: Any) -> None:
        if cuda:
            torch.cuda.synchronize()
        ends.append(time.perf_counter())

    register_optimizer_step_post_hook(after_step)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timed-out run still writes its record
    code: Any = 1  # an exception escaping the target (it propagates after the record is written)
    try:
        if target[0] == "-m":
            sys.argv = [target[1], *target[2:]]
            runpy.run_module(target[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(target)
            sys.path.insert(0, str(Path(target[0]).resolve().parent))
            runpy.run_path(target[0], run_name="__main__")
        code = 0
    except SystemExit as stop:
        code = 0 if stop.code is None else stop.code
    finally:
        write_json_atomic({"step_end_s": ends, "peak_bytes": peak_bytes(), "exit": code}, record)
    if code != 0:
        sys.exit(code)


# ----------------------------------------------------------------------------- editor child
def editor_child(model: Path, record: Path, warmup: int, reps: int) -> None:
    """Each editor method's iteration vs a raw UNet forward of the same rows, Ground-A-Score aggregated vs
    sequential, each iteration's peak memory above the model; rows appended to `record` as they come."""
    from dreamsteer.benchmarks.edit_step import EditorIteration, gas_subtasks, raw_forward, side_by_side
    from dreamsteer.benchmarks.steer import PeakMemory
    from dreamsteer.diffusion.backbone import load_backbone

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bb = load_backbone(str(model), "fp16" if device == "cuda" else "fp32", device)
    latent = bb.unet.config.sample_size
    rows: list[dict[str, Any]] = []

    def peak_of(step: Callable[[], None]) -> int:
        with PeakMemory(torch.device(device)) as mem:
            step()
        return mem.peak

    for method in EDITOR_METHODS:
        subtasks = gas_subtasks(latent) if method == "ground_a_score" else ()
        iteration = EditorIteration(bb, latent, method, subtasks)
        iteration()
        rows_per_iteration = round(iteration.editor.scorer.rows / iteration.k)
        raw = raw_forward(bb, latent, rows_per_iteration)
        t = side_by_side({"iteration": iteration, "raw": raw}, warmup, reps)
        rows.append({"name": f"{method} iteration", "baseline": f"raw UNet forward of {rows_per_iteration} rows", "method": method,
                     "seconds": t["iteration"], "baseline_seconds": t["raw"],
                     "note": f"{iteration.calls_per_iteration:.2f} UNet calls per iteration",
                     "peak_bytes": peak_of(iteration), "baseline_peak_bytes": peak_of(raw)})
        write_json_atomic(rows, record)
    subtasks = gas_subtasks(latent)
    aggregated = EditorIteration(bb, latent, "ground_a_score", subtasks, max_batch=4 * (len(subtasks) + 1))
    sequential = EditorIteration(bb, latent, "ground_a_score", subtasks, aggregate=False)
    t = side_by_side({"agg": aggregated, "seq": sequential}, warmup, reps)
    rows.append({"name": "ground_a_score aggregated", "baseline": f"ground_a_score sequential (K={len(subtasks)})", "seconds": t["agg"],
                 "baseline_seconds": t["seq"], "peak_bytes": peak_of(aggregated), "baseline_peak_bytes": peak_of(sequential)})
    by_method = {r.get("method"): r for r in rows}
    lusd, dds = by_method["lusd"], by_method["dds"]
    rows.append({"name": "lusd iteration", "baseline": "dds iteration", "seconds": lusd["seconds"], "baseline_seconds": dds["seconds"],
                 "peak_bytes": lusd["peak_bytes"], "baseline_peak_bytes": dds["peak_bytes"]})
    write_json_atomic(rows, record)


# ----------------------------------------------------------------------------- the driver
class Bench:
    """Runs the children, keeps the rows, rewrites results.json / results.md after each row."""

    def __init__(self, args: argparse.Namespace, scale: Scale):
        self.args, self.scale = args, scale
        self.out = Path(args.out).resolve()
        self.work = Path(args.work).resolve() if args.work else self.out / "work"
        self.peer_dir = Path(args.peer_dir).resolve() if args.peer_dir else None
        self.logs = self.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.cuda = torch.cuda.is_available()
        self.started = time.monotonic()
        self.rows: list[dict[str, Any]] = []
        self.meta = environment(args, scale)

    # -- children
    def remaining(self) -> float:
        budget = self.args.budget_s
        return float("inf") if budget is None else budget - (time.monotonic() - self.started)

    def spawn(self, name: str, cmd: list[str]) -> tuple[int, str]:
        """Run one child (its output to logs/<name>.log) within the remaining time budget; (exit code, log tail)."""
        remaining = self.remaining()
        (self.logs / f"{name}.json").unlink(missing_ok=True)  # the child's record: never a stale one from an earlier run
        if remaining < 10:
            return -1, "not run: the time budget (--budget-s) is spent"
        log = self.logs / f"{name}.log"
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        if self.args.threads:
            env["OMP_NUM_THREADS"] = str(self.args.threads)
        print(f"[{time.monotonic() - self.started:6.0f} s] {name}", flush=True)
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=self.work)
            try:
                code = proc.wait(timeout=None if remaining == float("inf") else remaining)
            except subprocess.TimeoutExpired:
                proc.terminate()  # the tracer writes its record on SIGTERM
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                code = -2
        tail = log.read_text(errors="replace")[-1500:]
        return code, ("timed out at the time budget\n" if code == -2 else "") + tail

    def traced(self, name: str, target: list[str]) -> dict[str, Any]:
        """Seconds per step and peak memory of `target` run under the tracer; or {"error": ...}."""
        record = self.logs / f"{name}.json"
        code, tail = self.spawn(name, [sys.executable, "-m", "dreamsteer.benchmarks.gpu_sd15", "--trace", str(record), "--", *target])
        failure = {"error": f"exit {code}: {tail.strip().splitlines()[-1] if tail.strip() else ''}"} if code != 0 else {}
        if not record.is_file():
            return failure
        data = json.loads(record.read_text())
        try:  # a run stopped at the time budget still reports the steps it made
            return {"seconds": seconds_per_step(data["step_end_s"], self.scale.warmup), "peak_bytes": data["peak_bytes"], **failure}
        except ValueError as err:
            return failure or {"error": str(err)}

    # -- rows
    def add(self, section: str, name: str, ours: dict[str, Any] | None, baseline: dict[str, Any] | None, baseline_name: str,
            note: str = "") -> None:
        row: dict[str, Any] = {"section": section, "name": name, "baseline": baseline_name, "note": note}
        for key, part in (("", ours), ("baseline_", baseline)):
            for field in ("seconds", "peak_bytes", "error"):
                if part and field in part:
                    row[key + field] = part[field]
        if "seconds" in row and "baseline_seconds" in row:
            row["time_ratio"] = row["seconds"] / row["baseline_seconds"]
        if min(row.get("peak_bytes", 0), row.get("baseline_peak_bytes", 0)) >= 2**20:  # a ratio of sub-MiB peaks is noise
            row["memory_ratio"] = row["peak_bytes"] / row["baseline_peak_bytes"]
        self.rows.append(row)
        self.write()

    def write(self) -> None:
        write_json_atomic({**self.meta, "elapsed_s": round(time.monotonic() - self.started, 1), "rows": self.rows},
                          self.out / "results.json")
        write_text_atomic(markdown(self.meta, self.rows), self.out / "results.md")

    # -- sections
    def ours_cmd(self, method: str, dtype: str, run: str, extra: tuple[str, ...] = ()) -> list[str]:
        s = self.scale
        cmd = ["-m", "dreamsteer.train", "personalize", f"method={method}", "model=local", f"model.pretrained={self.model}",
               f"model.dtype={dtype}", f"trainer={'gpu' if self.cuda else 'cpu'}", f"data.instance_dir={self.subject}",
               f"data.instance_prompt='{PROMPT}'", f"data.resolution={s.latent * 8}", f"data.batch_size={self.args.batch}",
               f"trainer.max_steps={s.warmup + s.steps + 1}", f"method.lr={LR[method]}", "logger=none", "export.enabled=false",
               "progress=false", f"output_dir={self.work / 'runs' / run}", *extra]
        return cmd + ([f"method.rank={RANK}"] if method == "lora" else [])

    def peer_cmd(self, method: str, run: str) -> list[str]:
        s = self.scale
        cmd = [str(self.peer_dir / PEER_SCRIPTS[method]), f"--pretrained_model_name_or_path={self.model}",
               f"--instance_data_dir={self.subject}", f"--instance_prompt={PROMPT}", f"--output_dir={self.work / 'runs' / run}",
               f"--resolution={s.latent * 8}", "--center_crop", f"--train_batch_size={self.args.batch}",
               f"--max_train_steps={s.warmup + s.steps + 1}", f"--learning_rate={LR[method]}", "--lr_scheduler=constant",
               "--lr_warmup_steps=0", "--mixed_precision=bf16", f"--checkpointing_steps={10**6}", "--seed=0",
               "--report_to=tensorboard"]
        return cmd + ([f"--rank={RANK}"] if method == "lora" else [])

    def peer_missing(self, method: str) -> str | None:
        """Why the peer script cannot run here, or None."""
        import importlib.util

        if self.peer_dir is None:
            return "no --peer-dir given (a diffusers checkout's examples/dreambooth)"
        script = self.peer_dir / PEER_SCRIPTS[method]
        if not script.is_file():
            return f"{script} not found"
        if importlib.util.find_spec("torchvision") is None:
            return "torchvision is not installed (the peer scripts import it)"
        return None

    def personalize(self, method: str) -> None:
        label = {"lora": "LoRA", "dreambooth": "DreamBooth"}[method]
        missing = self.peer_missing(method)
        peer = {"error": f"skipped: {missing}"} if missing else self.traced(f"peer_{method}", self.peer_cmd(method, f"peer_{method}"))
        peer_name = f"diffusers {PEER_SCRIPTS[method]} (bf16 mixed)"
        variants = [("bf16", "frozen bf16, bf16-mixed"), ("fp16", "frozen fp16 (sd15 preset), bf16-mixed")] if self.cuda else [("fp32", "fp32")]
        for dtype, what in variants:
            ours = self.traced(f"ours_{method}_{dtype}", self.ours_cmd(method, dtype, f"ours_{method}_{dtype}"))
            self.add("personalize", f"{label} step, ours ({what})", ours, peer, peer_name)

    def options(self) -> None:
        from omegaconf import OmegaConf

        from dreamsteer.train.config import compose

        defaults = compose("personalize", ["data.instance_dir=x", "data.instance_prompt=x"])
        dtype = "bf16" if self.cuda else "fp32"
        base: dict[str, Any] | None = None
        for key in SPEED_OPTIONS:
            value = OmegaConf.select(defaults, key, default=None)
            if not isinstance(value, bool):
                self.add("options", f"LoRA step with {key} flipped", None, None, "default",
                         note=f"skipped: conf/personalize.yaml has no boolean key {key}")
                continue
            if key == "compile.unet" and not self.cuda:
                self.add("options", f"LoRA step with {key} flipped", None, None, "default",
                         note="skipped on CPU: inductor's C++ build would be what is measured; the row is for CUDA")
                continue
            if base is None:
                base = self.traced("options_default", self.ours_cmd("lora", dtype, "options_default"))
            flipped = self.traced(f"options_{key}", self.ours_cmd("lora", dtype, f"options_{key}", (f"{key}={str(not value).lower()}",)))
            self.add("options", f"LoRA step, {key}={str(not value).lower()}", flipped, base, f"default ({key}={str(value).lower()})")

    def editor(self) -> None:
        record = self.logs / "editor.json"
        s = self.scale
        code, tail = self.spawn("editor", [sys.executable, "-m", "dreamsteer.benchmarks.gpu_sd15", "--child-editor", str(record),
                                           "--model", str(self.model), "--warmup", str(s.warmup), "--steps", str(s.steps)])
        rows = json.loads(record.read_text()) if record.is_file() else []
        for r in rows:
            baseline = {"seconds": r["baseline_seconds"], "peak_bytes": r["baseline_peak_bytes"]}
            self.add("editor", r["name"], r, baseline, r["baseline"], r.get("note", ""))
        if code != 0:
            self.add("editor", "editor child", {"error": f"exit {code}: {tail.strip()[-300:]}"}, None, "")

    def steer(self, kind: str) -> None:
        n_steps, n_ms, sampling = self.scale.steer
        record = self.logs / f"steer_{kind}.json"
        code, tail = self.spawn(f"steer_{kind}", [
            sys.executable, "-m", "dreamsteer.benchmarks.steer", "--kinds", kind, "--model", str(self.model),
            "--dtype", "fp16" if self.cuda else "fp32", "--threads", str(self.args.threads or torch.get_num_threads()),
            "--steps", str(n_steps), "--n-ms", str(n_ms), "--sampling-steps", str(sampling), "--repeats", str(self.scale.steps),
            "--json", str(record)])
        name = f"steer {kind} ({n_steps} EDSD steps, {n_ms} x {sampling} guided sampling steps)"
        if code != 0 or not record.is_file():
            self.add("steer", name, {"error": f"exit {code}: {tail.strip()[-300:]}"}, None, "")
            return
        p, st = (json.loads(record.read_text())[kind][part] for part in ("personalize", "steer"))
        total = sum(st["timings"][k] for k in ("mask", "guided_sampling", "steps", "export", "fit_overhead"))
        self.add("steer", name, {"seconds": total, "peak_bytes": st["peak_bytes"]}, {"seconds": p["step_s"], "peak_bytes": p["peak_bytes"]},
                 f"one {kind} personalization step", note="target for LoRA at full scale: < 60 s, < 12 GiB" if kind == "lora" else "")

    def run(self) -> None:
        from dreamsteer.data.samples import write_subject_set

        print(f"[{0:6.0f} s] building the model", flush=True)
        self.model = build_model(self.work / "model", self.scale, "cuda" if self.cuda else "cpu")
        self.subject = self.work / "subject"
        write_subject_set(self.subject, "cat", count=4)
        self.meta["unet_parameters_m"] = round(sum(
            p.numel() for p in __import__("diffusers").UNet2DConditionModel.from_pretrained(str(self.model), subfolder="unet").parameters()) / 1e6, 1)
        self.write()
        sections = self.args.sections
        order: list[tuple[str, Callable[[], None]]] = [
            ("personalize", lambda: self.personalize("lora")), ("editor", self.editor), ("steer", lambda: self.steer("lora")),
            ("personalize", lambda: self.personalize("dreambooth")), ("steer", lambda: self.steer("dreambooth")), ("options", self.options)]
        for section, step in order:
            if section in sections:
                step()
        print(markdown(self.meta, self.rows))
        print(f"results: {self.out / 'results.json'}, {self.out / 'results.md'}")


def environment(args: argparse.Namespace, scale: Scale) -> dict[str, Any]:
    import importlib.metadata as md

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "absent"

    cuda = torch.cuda.is_available()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                                                               f"torch threads {args.threads or torch.get_num_threads()})",
        "scale": "small" if args.small else "SD 1.5", "resolution": scale.latent * 8, "batch": args.batch,
        "warmup_steps": scale.warmup, "timed_steps": scale.steps,
        "versions": {name: version(name) for name in ("torch", "diffusers", "transformers", "lightning", "peft", "accelerate")},
        "python": platform.python_version(),
    }


def _mib(n: Any) -> str:
    return f"{n / 2**20:,.0f}" if isinstance(n, (int, float)) else ""


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The results as a markdown table: each row against its baseline (ratio = row / baseline)."""
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    lines = [f"{meta['scale']} benchmark, {meta['date']}, {meta['device']}; UNet {meta.get('unet_parameters_m', '?')}M parameters, "
             f"{meta['resolution']} px, batch {meta['batch']}; medians after {meta['warmup_steps']} warm-up, "
             f"{meta['timed_steps']} timed; Python {meta['python']}, {versions}.", "",
             "| section | measured | s | baseline | baseline s | time ratio | peak MiB | baseline peak MiB | memory ratio | note |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        note = "; ".join(x for x in (r.get("note", ""), r.get("error", ""), r.get("baseline_error", "") and f"baseline: {r['baseline_error']}") if x)
        s = lambda key, fmt: format(r[key], fmt) if key in r else ""  # noqa: E731
        lines.append(f"| {r['section']} | {r['name']} | {s('seconds', '.4g')} | {r['baseline']} | {s('baseline_seconds', '.4g')} | "
                     f"{s('time_ratio', '.3f')} | {_mib(r.get('peak_bytes'))} | {_mib(r.get('baseline_peak_bytes'))} | "
                     f"{s('memory_ratio', '.3f')} | {note.replace('|', '/').replace(chr(10), ' ')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--trace"]:  # internal: python -m dreamsteer.benchmarks.gpu_sd15 --trace RECORD -- TARGET...
        if len(argv) < 4 or argv[2] != "--":
            raise SystemExit("usage: --trace RECORD -- (-m module | script.py) [args...]")
        trace(Path(argv[1]), argv[3:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="a small model at 128 px and few steps (CPU smoke run)")
    parser.add_argument("--peer-dir", help="diffusers' examples/dreambooth folder (train_dreambooth_lora.py, train_dreambooth.py)")
    parser.add_argument("--out", default="outputs/gpu_sd15", help="results.json, results.md and the children's logs")
    parser.add_argument("--work", help="the built model, photos and training runs (GiBs at full scale; default <out>/work)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, help="timed steps / iterations (default: 15, --small 3)")
    parser.add_argument("--warmup", type=int, help="warm-up steps / iterations (default: 5, --small 1)")
    parser.add_argument("--threads", type=int, help="torch CPU threads of each child (default: torch's; 1 gives steadier times on a shared CPU)")
    parser.add_argument("--budget-s", type=float, help="start no child after this many seconds; stop a running one at it")
    parser.add_argument("--child-editor", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    scale = SMALL if args.small else FULL
    overrides = {k: v for k, v in (("steps", args.steps), ("warmup", args.warmup)) if v is not None}
    if any(v < 1 for v in overrides.values()) or args.batch < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--steps, --warmup, --batch and --threads must be >= 1")
    scale = scale.__class__(**{**scale.__dict__, **overrides})
    if args.child_editor:
        editor_child(Path(args.model), Path(args.child_editor), scale.warmup, scale.steps)
        return 0
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections: unknown {unknown}; choose from {list(SECTIONS)}")
    Bench(args, scale).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
