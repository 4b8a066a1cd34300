"""`python -m train edit`: single edits (outputs, determinism, DDS-SM with an exported adapter), input
validation before compute, and edit jobs through Lightning predict (failures recorded, re-runs skip)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreamsteer.train.config import compose
from dreamsteer.train.edit import EditJobsFailed

CAT = "a photo of a cat"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    from dreamsteer.data.samples import write_sample_images

    folder = tmp_path_factory.mktemp("photos")
    write_sample_images(folder, ["cat", "coffee"])
    # a readable header (the manifest check passes) but truncated data: the job fails at run time
    (folder / "broken.png").write_bytes((folder / "cat.png").read_bytes()[:200])
    return folder


def _export_lora(source: str, folder: Path) -> Path:
    from dreamsteer.checkpoints import export_adapter
    from dreamsteer.diffusion.adapters import add_lora
    from dreamsteer.diffusion.backbone import load_backbone

    bb = load_backbone(source)
    add_lora(bb, rank=4)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in bb.adapter.trainable_parameters(bb):  # as training would move them (LoRA B starts at 0)
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return export_adapter(bb, folder, {"instance_prompt": "a photo of a sks cat", "class_prompt": CAT})


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, tiny_dir) -> Path:
    return _export_lora("tiny", tmp_path_factory.mktemp("adapters") / "lora")


def _edit(out: Path, *overrides: str):
    from dreamsteer.train.edit import run

    return run(compose("edit", [*overrides, f"output_dir={out}", "progress=false"]))


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int16)


# ----------------------------------------------------------------------------- single edits
def test_single_edit_outputs_and_same_seed_same_image(photos, tmp_path):
    args = [f"image={photos / 'cat.png'}", f"source_prompt={CAT}", "target_prompt=a photo of a cat wearing a hat",
            "editor=lusd", "editor.steps=3", "seed=5"]
    record = _edit(tmp_path / "a", *args)
    _edit(tmp_path / "b", *args)
    _edit(tmp_path / "c", *args[:-1], "seed=6")
    a = tmp_path / "a"
    for name in ("edit.png", "edit.json", "edit_mask.png", "edit_source.png"):
        assert (a / name).is_file(), name
    saved = json.loads((a / "edit.json").read_text())
    for key in ("id", "image", "source_prompt", "target_prompt", "method", "adapter", "seed", "mask", "params", "timings",
                "source_resized", "trace"):
        assert key in saved, key
    assert saved["method"] == "lusd" and saved["trace"]["edit_tokens"] == ["hat"] and len(saved["trace"]["steps"]) == 3
    assert Image.open(saved["source_resized"]).size == (128, 128)
    assert record["output"] == str((a / "edit.png").resolve())
    assert np.array_equal(_pixels(a / "edit.png"), _pixels(tmp_path / "b" / "edit.png"))
    assert not np.array_equal(_pixels(a / "edit.png"), _pixels(tmp_path / "c" / "edit.png"))
    assert not np.array_equal(_pixels(a / "edit.png"), _pixels(a / "edit_source.png"))


def test_demo_entry_dds_sm_with_adapter_is_fast(photos, lora_dir, tmp_path):
    start = time.perf_counter()
    record = _edit(tmp_path, f"image={photos / 'cat.png'}", f"source_prompt={CAT}", "target_prompt=a photo of a sks cat",
                   "editor=dds_sm", f"adapter={lora_dir}", "editor.steps=10")
    elapsed = time.perf_counter() - start
    assert elapsed < 60, elapsed
    assert record["method"] == "dds_sm" and record["adapter_method"] == "lora"
    mask = np.asarray(Image.open(record["mask"]))
    assert mask.shape == (128, 128) and set(np.unique(mask)) <= {0, 255} and mask.max() == 255
    # two adapter states -> two UNet calls per step, all inside the same UNet
    assert record["trace"]["unet_calls"] == 2 * 10


def test_edit_on_sdxl_with_an_sdxl_lora_and_an_sd_lora_refused(photos, lora_dir, tmp_path):
    sdxl_lora = _export_lora("tiny-sdxl", tmp_path / "sdxl_lora")
    args = [f"image={photos / 'cat.png'}", f"source_prompt={CAT}", "target_prompt=a photo of a sks cat", "editor=dds_sm",
            "model=tiny_sdxl", "editor.steps=2"]
    record = _edit(tmp_path / "run", *args, f"adapter={sdxl_lora}")
    assert record["method"] == "dds_sm" and record["adapter_method"] == "lora" and record["trace"]["unet_calls"] == 2 * 2
    assert Image.open(record["output"]).size == (128, 128) and np.asarray(Image.open(record["mask"])).max() == 255
    with pytest.raises(ValueError, match="not on the configured model"):  # an SD 1.x adapter on the SDXL model
        _edit(tmp_path / "bad", *args, f"adapter={lora_dir}")


# ----------------------------------------------------------------------------- validation before compute
def _manifest(tmp_path: Path, *jobs: dict) -> Path:
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(json.dumps(j) for j in jobs) + "\n")
    return path


def _job(photos, job_id="j1", **fields):
    job = {"id": job_id, "image": str(photos / "cat.png"), "source_prompt": CAT, "target_prompt": "a photo of a dog"}
    job.update(fields)
    return job


def _bad(photos, tmp_path, tiny_dir, lora_dir, case):
    mask_small = tmp_path / "small_mask.png"
    Image.new("L", (10, 20), 255).save(mask_small)
    no_manifest = tmp_path / "no_manifest"
    no_manifest.mkdir()
    gas = {"method": "ground_a_score"}
    return {
        "unknown method": ([_job(photos, method="dds_xl")], r"job 'j1'.*field 'method'"),
        "missing prompt": ([_job(photos, target_prompt="")], r"job 'j1'.*field 'target_prompt'"),
        "box out of range": ([_job(photos, **gas, subtasks=[{"source": "cat", "target": "dog", "box": [0.1, 0.1, 1.5, 0.9]}])],
                             r"job 'j1'.*field 'subtasks\[0\]\.box'.*\[0, 1\]"),
        "empty box": ([_job(photos, **gas, subtasks=[{"source": "cat", "target": "dog", "box": [0.5, 0.1, 0.5, 0.9]}])],
                      r"job 'j1'.*field 'subtasks\[0\]\.box'.*empty"),
        "mask size": ([_job(photos, **gas, subtasks=[{"source": "cat", "target": "dog", "mask": str(mask_small)}])],
                      r"job 'j1'.*field 'subtasks\[0\]\.mask'.*10x20"),
        "adapter without adapter.json": ([_job(photos, method="dds_s", adapter=str(no_manifest))],
                                         r"job 'j1'.*field 'adapter'.*adapter\.json"),
        "unknown override": ([_job(photos, overrides={"stepz": 3})], r"job 'j1'.*field 'overrides.*stepz"),
        "bad override type": ([_job(photos, overrides={"steps": "many"})], r"job 'j1'.*field 'overrides.*steps"),
        "bad id": ([_job(photos, job_id="../escape")], r"field 'id'"),
        "duplicate id": ([_job(photos), _job(photos)], r"duplicate id 'j1'"),
        "dds_s without adapter": ([_job(photos, method="dds_s")], r"job 'j1'.*field 'adapter'"),
        "missing image": ([_job(photos, image=str(photos / "nope.png"))], r"job 'j1'.*field 'image'.*nope\.png: file not found"),
        "folder as image": ([_job(photos, image=str(photos))], r"job 'j1'.*field 'image'.*is a folder"),
    }[case]


@pytest.mark.parametrize("case", ["unknown method", "missing prompt", "box out of range", "empty box", "mask size",
                                  "adapter without adapter.json", "unknown override", "bad override type", "bad id",
                                  "duplicate id", "dds_s without adapter", "missing image", "folder as image"])
def test_bad_manifest_fails_before_compute(photos, tmp_path, tiny_dir, lora_dir, case):
    jobs, pattern = _bad(photos, tmp_path, tiny_dir, lora_dir, case)
    # a valid first job: nothing may be computed for it either
    manifest = _manifest(tmp_path, _job(photos, "ok", overrides={"steps": 1}), *jobs)
    with pytest.raises(ValueError, match=pattern):
        _edit(tmp_path / "out", f"jobs={manifest}")
    assert not (tmp_path / "out").exists()  # failed before the output folder was even created


def test_adapter_for_another_base_model_is_rejected(photos, tmp_path):
    other = _export_lora("tiny:1", tmp_path / "lora_tiny1")
    manifest = _manifest(tmp_path, _job(photos, method="dds_s", adapter=str(other)))
    with pytest.raises(ValueError, match=r"job 'j1'.*field 'adapter'.*tiny:1"):
        _edit(tmp_path / "out", f"jobs={manifest}")


def test_single_edit_bad_config(photos, tmp_path):
    from dreamsteer.train.config import ConfigError

    with pytest.raises(ConfigError, match="target_prompt"):
        _edit(tmp_path, f"image={photos / 'cat.png'}", f"source_prompt={CAT}")
    with pytest.raises(ValueError, match="editor.*steps"):
        _edit(tmp_path, f"image={photos / 'cat.png'}", f"source_prompt={CAT}", "target_prompt=a dog", "editor.steps=0")
    with pytest.raises(ValueError, match="subtasks"):
        _edit(tmp_path, f"image={photos / 'cat.png'}", f"source_prompt={CAT}", "target_prompt=a dog", "editor=dds",
              "subtasks=[{source: cat, target: dog, box: [0, 0, 1, 1]}]")


# ----------------------------------------------------------------------------- jobs (one process)
def test_jobs_record_failures_and_rerun_skips_finished(photos, tmp_path):
    steps = {"steps": 2}
    manifest = _manifest(
        tmp_path,
        _job(photos, "cat-dds", method="dds", seed=1, overrides=steps),
        _job(photos, "broken", image=str(photos / "broken.png"), overrides=steps),
        _job(photos, "undetected", method="ground_a_score", overrides=steps, subtasks=[{"source": "cat", "target": "dog"}]),
        _job(photos, "gas", method="ground_a_score", overrides=steps,
             subtasks=[{"source": "cat", "target": "dog", "box": [0.2, 0.1, 0.8, 0.9], "preserve": True}]),
    )
    out = tmp_path / "out"
    with pytest.raises(EditJobsFailed, match=r"2 of 4 edit jobs failed \(broken, undetected\).*failures\.jsonl") as failed:
        _edit(out, f"jobs={manifest}", "trainer.devices=1")
    summary = failed.value.summary
    assert sorted(summary["done"]) == ["cat-dds", "gas"]
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert {f["id"] for f in failures} == {"broken", "undetected"}
    reasons = {f["id"]: f["error"] for f in failures}
    assert "broken.png" in reasons["broken"] and "grounding.model" in reasons["undetected"]
    assert (out / "gas_mask.png").is_file() and not (out / "cat-dds_mask.png").exists()
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}

    with pytest.raises(EditJobsFailed) as failed:  # finished jobs are skipped, failures retried
        _edit(out, f"jobs={manifest}", "trainer.devices=1")
    summary = failed.value.summary
    assert sorted(summary["done"]) == ["cat-dds", "gas"] and len(summary["failures"]) == 2
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == stamps


def test_dds_sm_with_mask_image(photos, lora_dir, tmp_path):
    size = Image.open(photos / "cat.png").size
    mask = Image.new("L", size, 0)
    mask.paste(255, (0, 0, size[0] // 2, size[1]))  # left half
    mask.save(tmp_path / "left.png")
    args = [f"image={photos / 'cat.png'}", f"source_prompt={CAT}", "target_prompt=a photo of a sks cat", "editor=dds_sm",
            f"adapter={lora_dir}", "editor.steps=2"]
    record = _edit(tmp_path / "out", *args, f"editor.subject_mask={tmp_path / 'left.png'}")
    saved = np.asarray(Image.open(record["mask"])) > 127
    assert saved[:, :56].all() and not saved[:, 72:].any()  # the center-cropped left half of the photo
    Image.new("L", (64, 64), 255).save(tmp_path / "small.png")
    with pytest.raises(ValueError, match=r"field 'editor.subject_mask'.*64x64"):
        _edit(tmp_path / "bad", *args, f"editor.subject_mask={tmp_path / 'small.png'}")
