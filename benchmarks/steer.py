"""DreamSteerer cost, measured side by side with one personalization step of the same baseline.

    python -m benchmarks.steer                      # LoRA and DreamBooth on the tiny model
    python -m benchmarks.steer --kinds lora --steps 10 --n-ms 4 --sampling-steps 25 --json out.json
    python -m benchmarks.steer --model <SD folder> --dtype fp16   # half-precision frozen weights, mixed precision

For each baseline it prints the wall-time split of one steering run (subject mask, feature-guided
sampling of the mode-shifting images, the EDSD steps, export) and the peak memory that steering adds
above the loaded model + adapter, each relative to one personalization step (denoising loss on one
subject image, backward, AdamW step with a fresh optimizer) of the same baseline.

Every measurement runs in its own process after a warm-up (the first UNet call of a process is much
slower). Memory: on CUDA ``torch.cuda.max_memory_allocated`` above what was allocated before; on CPU
the resident set size polled every 5 ms above its value before the measured phase (in a
separate run: polling slows CPU compute, so timed runs go without it), with glibc's
dynamic mmap threshold pinned (``MALLOC_MMAP_THRESHOLD_``) so freed tensors leave the RSS at once.

    python -m benchmarks.steer --edsd-memory --latents 16 32 --n-ms 1

measures instead the peak memory of **one EDSD step** (`DreamSteererModule.accumulate_gradient`: the
forward and backward of every UNet row, no optimizer step) at SD-1.5 shape: a UNet with random weights
(``UNet2DConditionModel(sample_size=64, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
attention_head_dim=8, layers_per_block=2)``, 860M parameters) and a random CLIP text encoder of SD-1.5's
width (768, 12 layers; the tiny model's tokenizer), a LoRA adapter (rank 4), each latent size given, for
each memory setting (``--settings``): default, ``micro1`` (``memory.micro_batch=1``), ``ckpt``
(``memory.gradient_checkpointing``), both. One process (model built once), one no-grad forward as warm-up.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

SOURCE = "a photo of a cat next to a mirror"
MIXED = {"fp16": "16-mixed", "bf16": "bf16-mixed"}  # trainer.precision for half-precision frozen weights
PARENTS = {  # kind: (attach config, instance prompt, ref prompt)
    "lora": (dict(rank=4), "a photo of sks cat", "a photo of a sks cat next to a mirror"),
    "dreambooth": (dict(), "a photo of sks cat", "a photo of a sks cat next to a mirror"),
    "textual_inversion": (dict(tokens=["<sks>"], initializer_token="cat"), "a photo of <sks>", "a photo of a <sks> next to a mirror"),
    "custom_diffusion": (dict(modifier_tokens=["<new1>"], initializer_token="cat"), "a photo of <new1> cat",
                         "a photo of a <new1> cat next to a mirror"),
}


# ----------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory of a code block above its start: CUDA allocator stats, or the polled CPU RSS."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, self.rss())
            time.sleep(0.005)

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._start = self._max = self.rss()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, self.rss())
            self.peak = self._max - self._start


# ----------------------------------------------------------------------------- children
def make_parent(kind: str, model: str, root: Path) -> Path:
    """A personalized export of `kind` (adapter moved off its initialisation, as training would)."""
    from dreamsteer.checkpoints import export_adapter
    from dreamsteer.diffusion.adapters import attach_adapter
    from dreamsteer.diffusion.backbone import load_backbone

    target = root / f"parent_{kind}"
    if (target / "adapter.json").is_file():
        return target
    config, instance, _ = PARENTS[kind]
    bb = load_backbone(model)
    attach_adapter(bb, kind, **config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in bb.adapter.trainable_parameters(bb):
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return export_adapter(bb, target, {"instance_prompt": instance, "training_steps": 0})


def personalize_step(kind: str, model: str, device: str, root: Path, repeats: int, dtype: str = "fp32") -> dict[str, Any]:
    """Median wall time of one personalization step and the peak memory of one with a fresh optimizer
    (a half `dtype`: frozen weights in it, the step under autocast to it, as mixed precision trains)."""
    from dreamsteer.data.images import load_image_tensor
    from dreamsteer.lit_modules.personalize import DreamBoothModule, CustomDiffusionModule, LoraModule, TextualInversionModule
    from dreamsteer.train.config import compose
    from dreamsteer.train.personalize import validate_config

    modules = {"lora": LoraModule, "dreambooth": DreamBoothModule, "textual_inversion": TextualInversionModule,
               "custom_diffusion": CustomDiffusionModule}
    _, instance, _ = PARENTS[kind]
    cfg = validate_config(compose("personalize", [f"method={kind}", f"model.pretrained={model}", f"model.device={device}",
                                                  f"data.instance_dir={root / 'photos'}", f"data.instance_prompt='{instance}'"]))
    from dreamsteer.diffusion.backbone import load_backbone

    backbone = load_backbone(model, dtype, device)
    module = modules[kind](cfg, backbone=backbone).to(backbone.device)
    module.train()
    pixels = load_image_tensor(root / "photos" / "cat.png", backbone.resolution)[None].to(backbone.device)
    batch = {"pixel_values": pixels, "prompt": [instance], "example_index": torch.tensor([0])}

    half = backbone.dtype if dtype != "fp32" else None

    def step(optimizer: torch.optim.Optimizer, index: int) -> None:
        batch["example_index"] = torch.tensor([index])
        module.seed_micro_batch(batch)
        with torch.autocast(backbone.device.type, dtype=half, enabled=half is not None):
            loss, _ = module.compute_loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if backbone.device.type == "cuda":
            torch.cuda.synchronize(backbone.device)

    params = backbone.adapter.trainable_parameters(backbone)
    lr = float(cfg.method.lr)
    warm = torch.optim.AdamW(params, lr=lr)
    for i in range(2):
        step(warm, i)
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        step(warm, 10 + i)
        times.append(time.perf_counter() - start)
    del warm
    with PeakMemory(backbone.device) as mem:
        step(torch.optim.AdamW(params, lr=lr), 99)
    return {"step_s": statistics.median(times), "peak_bytes": mem.peak}


def steer_run(kind: str, model: str, device: str, root: Path, settings: dict[str, int], dtype: str = "fp32") -> dict[str, Any]:
    """A warm-up run, a timed run, then a run under the memory probe (polling slows CPU compute, so the
    timed run goes without it); returns the timed run's split and the probed run's peak above the model."""
    from dreamsteer.train.config import compose
    from dreamsteer.train.steer import prepare, steer

    _, _, ref = PARENTS[kind]
    base = [f"adapter={root / f'parent_{kind}'}", f"image={root / 'photos' / 'cat.png'}", f"source_prompt='{SOURCE}'",
            f"ref_prompt='{ref}'", f"model.pretrained={model}", f"model.device={device}", "logger=none", "progress=false",
            f"model.dtype={dtype}", f"trainer.precision={MIXED.get(dtype, '32-true')}"]
    warm = base + [f"output_dir={root / f'warm_{kind}'}", "steps=1", "mode_shift.n_ms=1", "mode_shift.sampling_steps=2"]
    steer(prepare(compose("steer", warm)))
    measured = base + [f"steps={settings['steps']}", f"mode_shift.n_ms={settings['n_ms']}",
                       f"mode_shift.sampling_steps={settings['sampling_steps']}", "mode_shift.log_unguided=false"]
    gc.collect()
    _, timings = steer(prepare(compose("steer", measured + [f"output_dir={root / f'steer_{kind}'}"])))
    gc.collect()
    prepared = prepare(compose("steer", measured + [f"output_dir={root / f'steer_mem_{kind}'}"]))
    with PeakMemory(prepared.backbone.device) as mem:
        steer(prepared)
    return {"timings": timings, "peak_bytes": mem.peak}


MEMORY_SETTINGS = {  # name: (memory.micro_batch, memory.gradient_checkpointing)
    "default": (0, False),
    "micro1": (1, False),
    "ckpt": (0, True),
    "micro1+ckpt": (1, True),
}


def sd15_backbone(device: str):
    """An SD-1.5-shaped backbone with random weights: UNet and text encoder of SD 1.5's shape, the tiny
    model's tokenizer, VAE (unused) and scheduler."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dreamsteer.diffusion.backbone import Backbone, load_backbone

    tiny = load_backbone("tiny")
    unet = UNet2DConditionModel(sample_size=64, block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                                attention_head_dim=8, layers_per_block=2)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tiny.tokenizer), hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                        bos_token_id=tiny.tokenizer.bos_token_id, eos_token_id=tiny.tokenizer.eos_token_id,
                                        pad_token_id=tiny.tokenizer.pad_token_id))
    bb = Backbone(unet=unet, vae=tiny.vae, text_encoder=text, tokenizer=tiny.tokenizer, scheduler=tiny.scheduler, source="sd15-shape-random")
    return bb.freeze().to(device)


def edsd_memory(latents: list[int], n_ms: int, device: str, settings: list[str]) -> dict[str, Any]:
    """Peak memory (above the loaded model + adapter) and wall time of one EDSD step for each latent size
    and memory setting (see the module docstring)."""
    from dreamsteer.diffusion.adapters import attach_adapter
    from dreamsteer.lit_modules.dreamsteerer import DreamSteererModule, EDSDConfig, MaskConfig, MemoryConfig, ModeShiftConfig, OptimConfig

    bb = sd15_backbone(device)
    attach_adapter(bb, "lora", rank=4)
    out: dict[str, Any] = {"unet_parameters": sum(p.numel() for p in bb.unet.parameters()),
                           "text_encoder_parameters": sum(p.numel() for p in bb.text_encoder.parameters())}
    for latent in latents:
        gen = torch.Generator().manual_seed(0)
        z_src = torch.randn(1, 4, latent, latent, generator=gen).to(bb.device)
        module = DreamSteererModule(bb, z_src, SOURCE, PARENTS["lora"][2], "cat", EDSDConfig(), ModeShiftConfig(n_ms=n_ms),
                                    MaskConfig(enabled=False), OptimConfig(), progress=False)
        module.ms_latents = torch.randn(n_ms, 4, latent, latent, generator=gen).to(bb.device)  # stand-ins: sampling is not measured
        for name in settings:
            micro_batch, checkpointing = MEMORY_SETTINGS[name]
            module.memory_cfg = MemoryConfig(checkpointing, micro_batch)
            if checkpointing:
                bb.unet.enable_gradient_checkpointing()
            else:
                bb.unet.disable_gradient_checkpointing()
            if not out.get("warm"):  # one-time allocations of the first call (oneDNN primitives, workspaces)
                with torch.no_grad():
                    bb.predict_eps(z_src, torch.tensor([500]), bb.encode_prompt([SOURCE]))
                out["warm"] = True
            for p in module.trainable_parameters():
                p.grad = None
            start = time.perf_counter()
            with PeakMemory(bb.device) as mem:
                module.accumulate_gradient(1)
            out[f"{latent}/{name}"] = {"peak_bytes": mem.peak, "step_s": time.perf_counter() - start}
            print(f"latent {latent}x{latent}, {name}: peak +{_mib(mem.peak).strip()}, {time.perf_counter() - start:.0f} s", flush=True)
    return out


# ----------------------------------------------------------------------------- driver
def _child(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    if args.child == "edsd":
        print("RESULT " + json.dumps(edsd_memory(args.latents, args.n_ms, args.device, args.settings)))
        return
    root = Path(args.workdir)
    if args.child == "personalize":
        result = personalize_step(args.kind, args.model, args.device, root, args.repeats, args.dtype)
    else:
        result = steer_run(args.kind, args.model, args.device, root,
                           {"steps": args.steps, "n_ms": args.n_ms, "sampling_steps": args.sampling_steps}, args.dtype)
    print("RESULT " + json.dumps(result))


def _spawn(args: argparse.Namespace, child: str, kind: str, root: Path) -> dict[str, Any]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="131072")
    cmd = [sys.executable, "-m", "dreamsteer.benchmarks.steer", "--child", child, "--kind", kind, "--workdir", str(root),
           "--model", args.model, "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads), "--repeats", str(args.repeats),
           "--steps", str(args.steps), "--n-ms", str(args.n_ms), "--sampling-steps", str(args.sampling_steps),
           "--latents", *map(str, args.latents), "--settings", *args.settings]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parent.parent)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark child {child}/{kind} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _mib(n: float) -> str:
    return f"{n / 2**20:8.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", nargs="+", default=["lora", "dreambooth"], choices=list(PARENTS))
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="frozen weights; half: mixed precision")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads in each measuring process (1: stable timings on a shared CPU)")
    parser.add_argument("--steps", type=int, default=10, help="EDSD steps (paper: ~10)")
    parser.add_argument("--n-ms", type=int, default=4, help="mode-shifting images")
    parser.add_argument("--sampling-steps", type=int, default=25, help="DDIM steps of the guided sampling")
    parser.add_argument("--repeats", type=int, default=5, help="timed personalization steps (median)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--edsd-memory", action="store_true", help="peak memory of one EDSD step at SD-1.5 shape (random weights)")
    parser.add_argument("--latents", type=int, nargs="+", default=[16, 32], help="--edsd-memory: latent sizes (SD 1.5 at 512 px: 64)")
    parser.add_argument("--settings", nargs="+", default=list(MEMORY_SETTINGS), choices=list(MEMORY_SETTINGS),
                        help="--edsd-memory: memory settings to measure (micro1: memory.micro_batch=1, ckpt: gradient checkpointing)")
    parser.add_argument("--child", choices=["personalize", "steer", "edsd"], help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        from dreamsteer.train.config import resolve_device

        args.device = resolve_device(args.device)
        _child(args)
        return 0

    from dreamsteer.data.samples import write_sample_images
    from dreamsteer.train.config import resolve_device

    args.device = resolve_device(args.device)
    if args.edsd_memory:
        return edsd_memory_report(args)
    results: dict[str, Any] = {"settings": {k: getattr(args, k) for k in ("model", "device", "dtype", "threads", "steps", "n_ms", "sampling_steps")}}
    with tempfile.TemporaryDirectory(prefix="bench-steer-") as tmp:
        root = Path(tmp)
        write_sample_images(root / "photos", ["cat"])
        for kind in args.kinds:
            make_parent(kind, args.model, root)
            results[kind] = {"personalize": _spawn(args, "personalize", kind, root), "steer": _spawn(args, "steer", kind, root)}

    print(f"\nDreamSteerer vs one personalization step ({args.model}, {args.device}, {args.threads} threads; "
          f"{args.steps} EDSD steps, {args.n_ms} mode-shifting images x {args.sampling_steps} DDIM steps)")
    for kind in args.kinds:
        p, s = results[kind]["personalize"], results[kind]["steer"]
        t = s["timings"]
        unit = p["step_s"]
        total = sum(t[k] for k in ("mask", "guided_sampling", "steps", "export", "fit_overhead"))
        print(f"\n[{kind}] one personalization step: {unit * 1000:.0f} ms, peak +{_mib(p['peak_bytes']).strip()}")
        rows = [("subject mask", t["mask"]), ("guided sampling (mode shifting)", t["guided_sampling"]),
                (f"EDSD steps ({args.steps})", t["steps"]), ("  per EDSD step", t["steps"] / args.steps),
                ("export", t["export"]), ("Lightning overhead", t["fit_overhead"]), ("total (model load excluded)", total)]
        for name, seconds in rows:
            print(f"  {name:<34} {seconds:8.3f} s  = {seconds / unit:7.1f} personalization steps")
        ratio = s["peak_bytes"] / max(p["peak_bytes"], 1)
        print(f"  {'peak memory above loaded model':<34} {_mib(s['peak_bytes'])}  = {ratio:7.2f} x a personalization step")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def edsd_memory_report(args: argparse.Namespace) -> int:
    """Spawn the EDSD-step measurement (one process), print it, and extrapolate each setting to SD's 64x64
    latent with the line through the two smallest latent areas (activations grow with the area)."""
    result = _spawn(args, "edsd", "lora", Path(tempfile.gettempdir()))
    print(f"\nOne EDSD step at SD-1.5 shape (LoRA rank 4, {args.n_ms} mode-shifting row(s), {args.device}, {args.threads} threads): "
          f"peak above the loaded model + adapter")
    latents = sorted(args.latents)
    for name in args.settings:
        cells = [f"{lat}x{lat}: {_mib(result[f'{lat}/{name}']['peak_bytes']).strip()} ({result[f'{lat}/{name}']['step_s']:.0f} s)" for lat in latents]
        line = f"  {name:<32} " + ", ".join(cells)
        if len(latents) >= 2:
            (a0, p0), (a1, p1) = [(lat * lat, result[f"{lat}/{name}"]["peak_bytes"]) for lat in latents[:2]]
            slope = (p1 - p0) / (a1 - a0)
            line += f"; extrapolated to 64x64: {_mib(p0 + slope * (64 * 64 - a0)).strip()}"
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), **result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
