"""Editor step benchmarks, measured side by side in one run (medians after warm-up).

    python benchmarks/edit_step.py            # SD-like random UNet (128, 256, 512, 512), latent 32x32
    python benchmarks/edit_step.py --quick    # the tiny model (a smoke run)

Prints, on the device it runs on (CUDA when available, else CPU):
1. a DDS iteration (sampling, one batched scorer call of 4 rows, CFG, plug-ins, SGD step) vs one raw
   UNet forward of the same batch of 4 (target ratio <= 1.10);
2. Ground-A-Score with K=3 subtasks (+ the full prompt): aggregated (16 rows in one call, one step)
   vs sequential (the reference: 4 calls of 4 rows, 4 optimizer steps) per iteration;
3. a LUSD step vs a plain DDS step: time and peak memory;
4. LUSD's attention mask through recorded q, k + SDPA vs materialized self-attention maps: peak memory.
Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the peak RSS growth of a fresh
subprocess per variant (Linux ``/proc/self/status`` VmHWM after resetting it), above the model.
The UNet is random, built here (no download); its size makes the UNet dominate as in real use.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dreamsteer.distill.config import method_defaults  # noqa: E402
from dreamsteer.distill.editor import Editor, editor_config  # noqa: E402
from dreamsteer.distill.masks import box_region  # noqa: E402
from dreamsteer.distill.methods import Subtask  # noqa: E402

SRC, TGT = "a photo of a cat on a sofa", "a photo of a cat wearing a hat on a sofa"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def build_backbone(quick: bool):
    """The tiny model's VAE / text encoder / tokenizer / scheduler; a big random UNet unless `quick`."""
    from diffusers import UNet2DConditionModel

    from dreamsteer.diffusion.backbone import Backbone, load_backbone

    tiny = load_backbone("tiny", device=DEVICE)
    if quick:
        return tiny, 16
    latent = 32
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=latent,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=tiny.text_encoder.config.hidden_size,
        attention_head_dim=8,
    ).to(DEVICE).eval().requires_grad_(False)
    bb = Backbone(unet=unet, vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer,
                  scheduler=tiny.scheduler, source="benchmark")
    return bb, latent


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def side_by_side(fns: dict[str, Callable[[], Any]], warmup: int, reps: int) -> dict[str, float]:
    """Median seconds per call of each function, timed round-robin (A, B, A, B, ...) after warm-up,
    so a change of machine load hits every variant alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


class EditorIteration:
    """A callable running one iteration of the production loop (`Editor.iteration`); counts UNet calls."""

    def __init__(self, bb, latent: int, method: str, subtasks=(), **overrides):
        values = method_defaults(method)
        values.update(overrides)
        self.cfg = editor_config(values)
        z_src = torch.randn((1, 4, latent, latent), generator=torch.Generator().manual_seed(0)).to(DEVICE)
        self.editor = Editor(bb, self.cfg, SRC, TGT, z_src, list(subtasks))
        self.z = z_src.clone().requires_grad_(True)
        self.opt = self.editor.optimizer(self.z)
        self.gen = torch.Generator().manual_seed(0)
        self.k = 0

    def __call__(self) -> None:
        with self.editor.recording():
            self.editor.iteration(self.z, min(self.k, self.cfg.steps - 1), self.gen, self.opt)
        self.k += 1

    @property
    def calls_per_iteration(self) -> float:
        return self.editor.scorer.calls / max(self.k, 1)


def raw_forward(bb, latent: int, batch: int) -> Callable[[], Any]:
    z = torch.randn((batch, 4, latent, latent), device=DEVICE, dtype=bb.unet.dtype)
    t = torch.full((batch,), 500, device=DEVICE)
    emb = bb.encode_prompt([SRC] * batch)

    def step() -> None:
        with torch.no_grad():
            bb.unet(z, t, encoder_hidden_states=emb)

    return step


def gas_subtasks(latent: int) -> list[Subtask]:
    boxes = [[0.05, 0.1, 0.45, 0.6], [0.5, 0.05, 0.95, 0.5], [0.2, 0.55, 0.8, 0.95]]
    phrases = [("cat", "dog"), ("sofa", "red sofa"), ("cushion", "pillow")]
    return [Subtask(s, t, box_region(b, (latent, latent))) for (s, t), b in zip(phrases, boxes)]


VARIANTS = {
    "dds": dict(method="dds"),
    "lusd": dict(method="lusd"),
    "lusd_maps": dict(method="lusd", keep_maps=True),
    "lusd_sdpa_d1": dict(method="lusd", mask_self_divisors=[1]),
    "lusd_maps_d1": dict(method="lusd", mask_self_divisors=[1], keep_maps=True),
}


def peak_variant(name: str, quick: bool) -> float:
    """Peak memory (MiB) of one iteration of a variant above the loaded model, in this process."""
    bb, latent = build_backbone(quick)
    spec = dict(VARIANTS[name])
    step = EditorIteration(bb, latent, spec.pop("method"), **spec)
    if DEVICE == "cuda":
        step()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    step()  # warm-up: allocator pools, oneDNN primitives
    rss = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    step()
    return (_status_kb("VmHWM") - rss) / 1024


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak(name: str, quick: bool) -> float:
    if DEVICE == "cuda":
        return peak_variant(name, quick)
    cmd = [sys.executable, __file__, "--peak", name] + (["--quick"] if quick else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the tiny model instead of the big random UNet")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak:
        print(json.dumps({"peak_mib": peak_variant(args.peak, args.quick)}))
        return

    bb, latent = build_backbone(args.quick)
    params = sum(p.numel() for p in bb.unet.parameters()) / 1e6
    print(f"device {DEVICE}, torch threads {torch.get_num_threads()}, UNet {params:.1f}M params, latent {latent}x{latent}, "
          f"medians of {args.reps} (round-robin) after {args.warmup} warm-up")
    w, r = args.warmup, args.reps

    dds_it, lusd_it = EditorIteration(bb, latent, "dds"), EditorIteration(bb, latent, "lusd")
    lusd_nofilter = EditorIteration(bb, latent, "lusd", filter=False)
    t = side_by_side({"raw": raw_forward(bb, latent, 4), "dds": dds_it, "raw2": raw_forward(bb, latent, 2),
                      "lusd": lusd_it, "lusd_nofilter": lusd_nofilter}, w, r)
    print(f"\n1. DDS iteration vs one raw UNet forward of the same batch (4 rows)\n   raw forward   {t['raw'] * 1e3:9.1f} ms\n"
          f"   DDS iteration {t['dds'] * 1e3:9.1f} ms   ratio {t['dds'] / t['raw']:.3f} (target <= 1.10)")

    subs = gas_subtasks(latent)
    g = side_by_side({"agg": EditorIteration(bb, latent, "ground_a_score", subs, max_batch=16),
                      "seq": EditorIteration(bb, latent, "ground_a_score", subs, aggregate=False)}, w, r)
    print(f"\n2. Ground-A-Score, K=3 subtasks + full prompt, per iteration\n   aggregated (1 call x 16 rows, 1 step)  {g['agg'] * 1e3:9.1f} ms\n"
          f"   sequential (4 calls x 4 rows, 4 steps) {g['seq'] * 1e3:9.1f} ms   speed-up {g['seq'] / g['agg']:.2f}x")

    dds_mem, lusd_mem = peak("dds", args.quick), peak("lusd", args.quick)
    print(f"\n3. LUSD step vs plain DDS step (time per iteration, peak memory of one iteration above the model)\n"
          f"   DDS                 {t['dds'] * 1e3:9.1f} ms   {dds_it.calls_per_iteration:.2f} UNet calls x 4 rows   peak +{dds_mem:8.1f} MiB\n"
          f"   LUSD                {t['lusd'] * 1e3:9.1f} ms   {lusd_it.calls_per_iteration:.2f} UNet calls x 2 rows   peak +{lusd_mem:8.1f} MiB\n"
          f"   LUSD without filter {t['lusd_nofilter'] * 1e3:9.1f} ms   (raw forward of 2 rows: {t['raw2'] * 1e3:.1f} ms; the rest is capture + mask)\n"
          "   (LUSD's filter re-draws the noise while std(delta) < eta: each re-draw is one more UNet call)")

    rows = []
    for divisor, sdpa, maps in ((2, "lusd", "lusd_maps"), (1, "lusd_sdpa_d1", "lusd_maps_d1")):
        side = latent // divisor
        rows.append(f"   self layers at latent/{divisor} ({side * side} tokens): SDPA +{peak(sdpa, args.quick):8.1f} MiB"
                    f"   materialized maps +{peak(maps, args.quick):8.1f} MiB")
    print("\n4. LUSD mask: A_S @ a by SDPA from recorded q, k vs materialized A_S (peak memory of one step)\n" + "\n".join(rows))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
