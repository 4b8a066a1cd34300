"""Step time and peak memory of the personalization LightningModules vs a plain PyTorch loop.

    python -m benchmarks.personalize_step [--steps 8] [--warmup 2] [--methods lora,dreambooth,...] [--json out.json]

For each method, on one random SD-shaped model big enough that the UNet dominates (UNet blocks
(64, 128, 256) with cross-attention, 2 layers each, cross-attention dim 256, 25.4M parameters, latent 32x32 = 256 px
images), in one process:

- ours: `lit_modules.personalize` + `data.subject.SubjectDataModule` under a Lightning Trainer
  (the `personalize` task's settings: gradient clipping 1.0, AdamW, constant lr, no logger);
  a step is everything between consecutive ``on_train_batch_start`` calls (data loading, the
  optimizer step and Lightning's own bookkeeping included);
- plain: the same math written out with the diffusers modules on a second copy of the same model
  with the same adapter, the same DataLoader, ``loss.backward(); clip_grad_norm_; opt.step()``.

Times are interleaved step by step (one plain step inside each Lightning step, timed apart), so
both loops see the same load on a shared machine; medians after warm-up, of wall time and of
process CPU time (which other jobs on the machine barely disturb). Peak memory above the
idle baseline comes from a second pass running each loop alone, alternating, smallest of 2
rounds; ours includes writing its final ``last.ckpt`` (CUDA: ``max_memory_allocated``; CPU:
resident set size sampled every 2 ms, after returning freed memory to the OS with
``malloc_trim``). Ratios are ours / plain; these rows run with caching off, as the plain loop
encodes every step. A last row times ours with latent and text-embedding caching off vs on
(``cache.*``, one method, alternating runs) and prints the ratio of step times cached / uncached.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

METHOD_PROMPTS = {
    "lora": "a photo of sks cat",
    "dreambooth": "a photo of sks cat",
    "textual_inversion": "a photo of <sks> cat",
    "custom_diffusion": "a photo of <new1> cat",
}


def build_bench_model(directory: Path, seed: int = 0) -> Path:
    """A 25.4M-parameter (UNet) SD-1.x-shaped pipeline with random weights, saved as a diffusers folder."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from dreamsteer.diffusion.tiny import write_tiny_tokenizer_files

    if (directory / "model_index.json").is_file():
        return directory
    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_tokenizer_files(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=77)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(64, 128, 256), layers_per_block=2, cross_attention_dim=256, attention_head_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=16, sample_size=256,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=256,
    ))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(directory), safe_serialization=True)
    return directory


class PeakMemory:
    """Peak memory above the baseline at `start()` (CUDA allocator, or sampled process RSS on CPU)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._peak = 0
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    def start(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed pages back so the baseline is honest
        except OSError:
            pass
        self._base = self._peak = self._rss()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._rss())
            time.sleep(0.002)

    def stop(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self._base
        self._stop.set()
        self._thread.join()
        return self._peak - self._base


def _config(method: str, instance_dir: Path, model_dir: Path, out: Path, steps: int, device: str) -> dict:
    from omegaconf import OmegaConf

    from dreamsteer.train.config import compose
    from dreamsteer.train.personalize import validate_config

    cfg = compose("personalize", [
        f"method={method}", f"model.pretrained={model_dir}", f"data.instance_dir={instance_dir}",
        f"data.instance_prompt='{METHOD_PROMPTS[method]}'", "data.batch_size=2", f"trainer.max_steps={steps}",
        f"trainer.accelerator={device}", "logger=none", "export.enabled=false", f"output_dir={out}",
        "cache.latents=false", "cache.text_embeddings=false",  # the plain loop encodes every step too
    ])
    return OmegaConf.to_container(validate_config(cfg), resolve=True)


def _dataloader(cfg: dict, items, resolution: int):
    from omegaconf import OmegaConf

    from dreamsteer.data.subject import Concept, SubjectDataModule

    concepts = [Concept(items, cfg["data"]["instance_prompt"])]
    return SubjectDataModule(OmegaConf.create(cfg["data"]), concepts, resolution, seed=cfg["seed"]).train_dataloader()


class PlainLoop:
    """The same objective, written out on its own copy of the model: encode, noise, UNet, MSE,
    backward, clip, AdamW step."""

    def __init__(self, cfg: dict, model_dir: Path, items, device: torch.device):
        from omegaconf import OmegaConf

        from dreamsteer.diffusion.adapters import attach_adapter
        from dreamsteer.diffusion.backbone import load_backbone
        from dreamsteer.lit_modules.personalize import MODULES

        self.device = device
        self.backbone = backbone = load_backbone(str(model_dir), device=device)
        torch.manual_seed(cfg["seed"])
        adapter = attach_adapter(backbone, cfg["method"]["name"], **MODULES[cfg["method"]["name"]].adapter_kwargs(OmegaConf.create(cfg["method"])))
        self.params = adapter.trainable_parameters(backbone)
        for p in self.params:
            p.data = p.data.float()
        self.text_trains = any(n.startswith("text_encoder.") for n, _ in adapter.named_trainable(backbone))
        backbone.unet.train()
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg["method"]["lr"], betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        self.loader = iter(_dataloader(cfg, items, backbone.resolution))
        self.alphas = backbone.scheduler.alphas_cumprod.to(device)

    def step(self) -> float:
        start = time.perf_counter()
        b, device = self.backbone, self.device
        batch = next(self.loader)
        pixels = batch["pixel_values"].to(device)
        with torch.no_grad():
            z = b.vae.encode(pixels).latent_dist.sample() * b.vae.config.scaling_factor
        eps = torch.randn_like(z)
        t = torch.randint(0, 1000, (z.shape[0],), device=device)
        a = self.alphas[t].reshape(-1, 1, 1, 1)
        z_t = a.sqrt() * z + (1 - a).sqrt() * eps
        ids = b.tokenize(list(batch["prompt"]))
        with torch.set_grad_enabled(self.text_trains):
            emb = b.text_encoder(ids)[0]
        loss = (b.unet(z_t, t, encoder_hidden_states=emb).sample - eps).square().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


def _ours(cfg: dict, model_dir: Path, items, device: torch.device, callbacks=()):
    from omegaconf import OmegaConf

    from dreamsteer.data.subject import Concept, SubjectDataModule
    from dreamsteer.diffusion.backbone import load_backbone
    from dreamsteer.lit_modules.personalize import MODULES
    from dreamsteer.train.personalize import build_trainer

    backbone = load_backbone(str(model_dir))
    module = MODULES[cfg["method"]["name"]](cfg, backbone)
    backbone.to(device)  # on the device before any baseline, as the plain loop's model is
    datamodule = SubjectDataModule(OmegaConf.create(cfg["data"]), [Concept(items, cfg["data"]["instance_prompt"])], backbone.resolution, seed=cfg["seed"])
    trainer = build_trainer(OmegaConf.create(cfg), Path(cfg["output_dir"]), callbacks=list(callbacks))
    return module, datamodule, trainer


def bench_time(cfg: dict, model_dir: Path, items, warmup: int, device: torch.device) -> dict[str, float]:
    """Median step times of ours and plain, interleaved step by step so both see the same machine load.

    A callback runs one plain step at the start of each Lightning step; our step is the time from
    the end of that plain step to the start of the next one. Wall time and process CPU time (all
    threads; robust to other jobs on a shared machine) are both measured.
    """
    from lightning.pytorch.callbacks import Callback

    plain = PlainLoop(cfg, model_dir, items, device)
    ours_wall: list[float] = []
    ours_cpu: list[float] = []
    plain_wall: list[float] = []
    plain_cpu: list[float] = []
    mark: list[tuple[float, float]] = []

    class Interleave(Callback):
        def on_train_batch_start(self, trainer, *args) -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()
            wall, cpu = time.perf_counter(), time.process_time()
            if mark:
                ours_wall.append(wall - mark[-1][0])
                ours_cpu.append(cpu - mark[-1][1])
            cpu = time.process_time()
            plain_wall.append(plain.step())
            plain_cpu.append(time.process_time() - cpu)
            mark.append((time.perf_counter(), time.process_time()))

    module, datamodule, trainer = _ours(cfg, model_dir, items, device, [Interleave()])
    trainer.fit(module, datamodule=datamodule)
    med = lambda values, skip: statistics.median(values[skip:])  # noqa: E731
    return {
        "ours_s": med(ours_wall, warmup), "plain_s": med(plain_wall, warmup + 1),
        "ours_cpu_s": med(ours_cpu, warmup), "plain_cpu_s": med(plain_cpu, warmup + 1),
    }


def bench_memory(cfg: dict, model_dir: Path, items, steps: int, device: torch.device, rounds: int = 2) -> tuple[int, int]:
    """Peak memory above the idle baseline of each loop run alone for `steps` steps; the loops
    alternate for `rounds` rounds and the smallest peak of each is kept (RSS is noisy on CPU).
    Ours writes no periodic checkpoint here, only the final ``last.ckpt``."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.merge(cfg, {"trainer": {"max_steps": steps, "checkpoint_every_n_steps": 10**9}}))
    ours, plain = [], []
    for _ in range(rounds):
        loop = PlainLoop(cfg, model_dir, items, device)
        memory = PeakMemory(device).start()
        for _ in range(steps):
            loop.step()
        plain.append(memory.stop())
        del loop
        gc.collect()
        module, datamodule, trainer = _ours(cfg, model_dir, items, device)
        memory = PeakMemory(device).start()
        trainer.fit(module, datamodule=datamodule)
        ours.append(memory.stop())
        del module, datamodule, trainer
        gc.collect()
    return min(ours), min(plain)


def bench_caching(cfg: dict, model_dir: Path, items, warmup: int, device: torch.device, rounds: int = 2) -> dict[str, float]:
    """Median step time of ours with latent + text-embedding caching off and on (the smallest median of
    `rounds` alternating runs each), wall and process CPU time, and their ratios on / off."""
    from lightning.pytorch.callbacks import Callback
    from omegaconf import OmegaConf

    def median_step(cached: bool) -> tuple[float, float]:
        run_cfg = OmegaConf.to_container(OmegaConf.merge(cfg, {"cache": {"latents": cached, "text_embeddings": cached}}))
        marks: list[tuple[float, float]] = []

        class Clock(Callback):
            def on_train_batch_start(self, trainer, *args) -> None:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                marks.append((time.perf_counter(), time.process_time()))

        module, datamodule, trainer = _ours(run_cfg, model_dir, items, device, [Clock()])
        trainer.fit(module, datamodule=datamodule)
        steps = list(zip(marks, marks[1:]))[warmup:]
        return statistics.median(b[0] - a[0] for a, b in steps), statistics.median(b[1] - a[1] for a, b in steps)

    off, on = [], []
    for _ in range(rounds):
        off.append(median_step(False))
        on.append(median_step(True))
    (wall_off, cpu_off), (wall_on, cpu_on) = (min(x[0] for x in off), min(x[1] for x in off)), (min(x[0] for x in on), min(x[1] for x in on))
    return {"uncached_s": wall_off, "cached_s": wall_on, "ratio": wall_on / wall_off,
            "uncached_cpu_s": cpu_off, "cached_cpu_s": cpu_on, "cpu_ratio": cpu_on / cpu_off}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="measured steps per method and loop")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--memory-steps", type=int, default=3, help="steps of each loop in the memory pass")
    parser.add_argument("--methods", default="lora,textual_inversion,custom_diffusion,dreambooth")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--caching-method", default="lora", help="method of the caching row ('' to skip it)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    from dreamsteer.data.samples import write_subject_set
    from dreamsteer.data.subject import read_instance_items

    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="personalize-bench-"))
    model_dir = build_bench_model(work / "model")
    write_subject_set(work / "subject", "cat", count=4)
    items = read_instance_items(work / "subject")
    n_params = sum(p.numel() for p in __import__("diffusers").UNet2DConditionModel.from_pretrained(str(model_dir), subfolder="unet").parameters())
    print(f"model: UNet {n_params / 1e6:.1f}M params, latent 32x32, batch 2, device {device}, torch threads {torch.get_num_threads()}")
    header = f"{'method':<18} {'ours s/step':>11} {'plain s/step':>12} {'wall ratio':>10} {'cpu ratio':>9} {'ours MiB':>9} {'plain MiB':>9} {'mem ratio':>9}"
    print(header)
    results = []
    for method in [m for m in args.methods.split(",") if m]:
        cfg = _config(method, work / "subject", model_dir, work / f"out-{method}", args.warmup + args.steps + 1, device.type)
        row = {"method": method, **bench_time(cfg, model_dir, items, args.warmup, device)}
        gc.collect()
        ours_m, plain_m = bench_memory(cfg, model_dir, items, args.memory_steps, device)
        gc.collect()
        row.update(
            wall_ratio=row["ours_s"] / row["plain_s"], cpu_ratio=row["ours_cpu_s"] / row["plain_cpu_s"],
            ours_mib=ours_m / 2**20, plain_mib=plain_m / 2**20, memory_ratio=ours_m / max(plain_m, 1),
        )
        results.append(row)
        print(
            f"{method:<18} {row['ours_s']:>11.3f} {row['plain_s']:>12.3f} {row['wall_ratio']:>10.3f} {row['cpu_ratio']:>9.3f} "
            f"{row['ours_mib']:>9.0f} {row['plain_mib']:>9.0f} {row['memory_ratio']:>9.3f}",
            flush=True,
        )
    if args.caching_method:
        method = args.caching_method
        cfg = _config(method, work / "subject", model_dir, work / "out-caching", args.warmup + args.steps + 1, device.type)
        row = {"method": f"caching ({method})", **bench_caching(cfg, model_dir, items, args.warmup, device)}
        results.append(row)
        print(f"caching ({method}): uncached {row['uncached_s']:.3f} s/step, cached {row['cached_s']:.3f} s/step, "
              f"ratio cached/uncached {row['ratio']:.3f} wall, {row['cpu_ratio']:.3f} CPU "
              f"({row['uncached_cpu_s']:.3f} vs {row['cached_cpu_s']:.3f} CPU s/step; 4 images, center crop, flip 0.5: 8 distinct views)", flush=True)
    print(f"load average during the run: {' '.join(f'{x:.1f}' for x in __import__('os').getloadavg())} (ratios target <= 1.05)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
