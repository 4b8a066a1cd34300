"""`evaluate` over fixture edit runs in the editor's output format: metrics.json, the HTML report, errors."""
from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dreamsteer.data.images import resize_and_crop, save_image_atomic
from dreamsteer.data.samples import sample_photo
from dreamsteer.metrics.clip import build_tiny_clip
from dreamsteer.metrics.runs import RunFormatError, load_run
from tests.conftest import REPO_ROOT
from dreamsteer.train.config import ConfigError, compose
from dreamsteer.train.evaluate import run

SIZE = 96


def make_run(directory: Path, brighten: float, ids=("a", "b", "c"), failed=("d",)) -> Path:
    """An edit run as the editor writes it: <id>.png/.json/_source.png(/_mask.png) + failures.jsonl.

    Job "a" is left unchanged when brighten=0; every job brightens the top-left quarter by `brighten`.
    "b" carries an edit mask, "c" a Ground-A-Score subtask box and a second method.
    """
    directory.mkdir(parents=True, exist_ok=True)
    original = directory / "cat_full.png"
    sample_photo("cat").save(original)
    source = resize_and_crop(sample_photo("cat"), SIZE)
    q = SIZE // 4
    for i, job_id in enumerate(ids):
        pixels = np.asarray(source, dtype=np.float32).copy()
        pixels[q : 2 * q, q : 2 * q] = pixels[q : 2 * q, q : 2 * q] * (1 - brighten) + 255 * brighten
        save_image_atomic(Image.fromarray(pixels.round().astype(np.uint8)), directory / f"{job_id}.png")
        save_image_atomic(source, directory / f"{job_id}_source.png")
        record = {
            "id": job_id, "image": str(original), "source_prompt": "a photo of a cat",
            "target_prompt": "a photo of a cat wearing a hat", "method": "dds" if job_id != "c" else "lusd",
            "adapter": None, "seed": i, "mask": None, "params": {"steps": 2}, "timings": {"total_s": 0.1},
            "source_resized": f"{job_id}_source.png",
        }  # fmt: skip
        if job_id == "b":
            mask = np.zeros((SIZE, SIZE), np.uint8)
            mask[q : 2 * q, q : 2 * q] = 255
            Image.fromarray(mask).save(directory / "b_mask.png")
            record["mask"] = str(directory / "b_mask.png")
        if job_id == "e":  # a MagicBrush-style reference edit: preservation metrics compare against it
            record["ground_truth"] = f"{job_id}.png"
        if job_id == "c":
            record["subtasks"] = [{"source": "cat", "target": "hat", "box": [0.25, 0.25, 0.5, 0.5], "preserve": False}]
        (directory / f"{job_id}.json").write_text(json.dumps(record))
    (directory / "failures.jsonl").write_text("".join(json.dumps({"id": f, "error": "RuntimeError: out of memory"}) + "\n" for f in failed))
    return directory


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip", seed=0)


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    from dreamsteer.metrics.lpips import LPIPS

    torch.manual_seed(0)
    model = LPIPS("alex")
    for i in range(5):
        getattr(model, f"lin{i}").model[0].weight.data.abs_()
    path = tmp_path_factory.mktemp("lpips") / "lpips_alex.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata={"net": "alex"})
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("runs")
    return make_run(root / "baseline", 0.0), make_run(root / "steered", 0.6, ids=("a", "b", "c", "e"), failed=())


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.external: list[str] = []
        self.tags: dict[str, int] = {}

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        for key in ("src", "href"):
            value = attrs.get(key) or ""
            if value.startswith(("http:", "https:", "//")) or (tag in ("script", "link") and value):
                self.external.append(value)


def _check_report(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    assert page.images and not page.external
    for src in page.images:
        if src.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")):
            data = base64.b64decode(src.split(",", 1)[1])
        else:
            assert not os.path.isabs(src) and ".." not in src
            data = (path.parent / src).read_bytes()
        Image.open(io.BytesIO(data)).load()
    return page


def test_evaluate_single_run_metrics_and_report(runs, tiny_clip, lpips_file, tmp_path):
    baseline, _ = runs
    cfg = compose("evaluate", [f"run={baseline}", f"clip_model={tiny_clip}", f"lpips_weights=[{lpips_file}]", "ms_ssim_scales=3", "logger=none", f"output_dir={tmp_path}"])
    results = run(cfg)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["runs"][0]["jobs"].keys() == results["runs"][0]["jobs"].keys() == {"a", "b", "c"}
    result = saved["runs"][0]
    assert result["num_failed"] == 1 and result["failures"] == {"d": "RuntimeError: out of memory"}
    for job in result["jobs"].values():  # every edit of this run is the unchanged source
        m = job["metrics"]
        assert m["l1"] == 0.0 and m["ssim"] == pytest.approx(1.0) and m["ms_ssim"] == pytest.approx(1.0)
        assert m["lpips_alex"] == 0.0 and m["clip_i"] == pytest.approx(1.0)
        assert m["clip_r"] == pytest.approx(1.0)  # an unchanged image has CLIP-R 1
        assert "clip_t" in m and "dino" not in m and "lpips_vgg" not in m
    assert "masked_clip" in result["jobs"]["b"]["metrics"] and "masked_clip" in result["jobs"]["c"]["metrics"]
    assert "masked_clip" not in result["jobs"]["a"]["metrics"] and "no edit region" in result["jobs"]["a"]["skipped"]["masked_clip"]
    # models that are not given are skipped with a reason, never reported as 0
    assert "dino_model" in result["unavailable"]["dino"] and "lpips_weights" in result["unavailable"]["lpips_vgg"]
    assert result["aggregate"]["dino"] == {"mean": None, "reason": result["unavailable"]["dino"]}
    assert result["aggregate"]["l1"] == {"mean": 0.0, "std": 0.0, "count": 3}
    # nothing beats the source: success rate 0 everywhere (the failed job is in the denominator), L1* undefined
    assert result["curves"]["success_rate"] == [0.0] * 41 and result["areas"]["clip_auc"]["value"] == 0.0
    assert result["areas"]["l1_star"]["value"] is None and "no edit has CLIP-R > 1.00" in result["areas"]["l1_star"]["reason"]
    assert result["methods"] == ["dds", "lusd"] and set(result["by_method"]) == {"dds", "lusd"}
    page = _check_report(tmp_path / "report.html")
    assert page.tags.get("svg", 0) >= 3
    assert len(page.images) == 3 + 3 + 1  # per job: source + edited, plus job b's mask


def test_evaluate_compares_runs_by_job_id(runs, tiny_clip, tmp_path):
    from dreamsteer.data.images import load_image, list_images
    from dreamsteer.data.samples import write_subject_set
    from dreamsteer.metrics.clip import ClipEmbedder

    baseline, steered = runs
    concept = tmp_path / "concept"
    write_subject_set(concept, "cat", count=2)
    cfg = compose(
        "evaluate",
        [f"runs=[{baseline},{steered}]", "labels=[baseline,steered]", f"clip_model={tiny_clip}", f"concept_images={concept}",
         "embed_images=false", "logger=none", f"output_dir={tmp_path / 'out'}"],
    )  # fmt: skip
    results = run(cfg)
    base, other = results["runs"]
    assert (base["label"], other["label"]) == ("baseline", "steered") and other["num_jobs"] == 4
    # DreamSteerer's CLIP-I: mean cosine to the concept photos, by hand
    clip = ClipEmbedder.load(str(tiny_clip))
    refs = clip.images([load_image(p) for p in list_images(concept)])
    edited = clip.images([load_image(steered / "b.png")])[0]
    assert other["jobs"]["b"]["metrics"]["clip_i_concept"] == pytest.approx(float((refs @ edited).mean()), abs=1e-6)
    # job e names a ground truth (its own output here): L1 / SSIM compare against it, not the source
    e = other["jobs"]["e"]
    assert e["reference"] == "ground_truth" and e["metrics"]["l1"] == 0.0 and other["jobs"]["b"]["metrics"]["l1"] > 0.01
    comp = results["comparison"][0]
    assert comp["common_jobs"] == ["a", "b", "c"] and comp["only_other"] == ["e"] and comp["only_baseline"] == []
    l1 = comp["metrics"]["l1"]
    deltas = [other["jobs"][i]["metrics"]["l1"] - base["jobs"][i]["metrics"]["l1"] for i in "abc"]
    assert l1["mean_delta"] == pytest.approx(sum(deltas) / 3) and l1["mean_delta"] > 0.01
    assert l1["improved"] == 0 and comp["metrics"]["ssim"]["improved"] == 0  # brightening only hurts preservation
    assert "ms_ssim" in base["jobs"]["a"]["skipped"] and "176" in base["jobs"]["a"]["skipped"]["ms_ssim"]
    page = _check_report(tmp_path / "out" / "report.html")
    assert all(src.startswith("report_files/") for src in page.images)
    # source + both edits for a, b, c; + mask for b; job e: source, ground truth, its edit
    assert len(page.images) == 3 * 3 + 1 + 3
    text = (tmp_path / "out" / "report.html").read_text()
    assert "Paired comparison" in text and "steered vs baseline" in text and "not in this run" in text


def test_metric_without_model_is_skipped_with_reason(runs, tmp_path):
    baseline, _ = runs
    results = run(compose("evaluate", [f"run={baseline}", f"clip_model={tmp_path / 'missing-clip'}", "logger=none", f"output_dir={tmp_path}"]))
    result = results["runs"][0]
    assert results["models"]["clip"]["status"] == "unavailable"
    for name in ("clip_t", "clip_r", "clip_i", "masked_clip"):
        assert "folder not found" in result["unavailable"][name]
        assert result["aggregate"][name]["mean"] is None
        assert all(name not in job["metrics"] for job in result["jobs"].values())
    assert result["areas"]["clip_auc"]["value"] is None and "folder not found" in result["areas"]["clip_auc"]["reason"]
    assert result["aggregate"]["l1"]["count"] == 3  # pixel metrics still computed
    _check_report(tmp_path / "report.html")
    with pytest.raises(ValueError, match="missing-clip"):
        run(compose("evaluate", [f"run={baseline}", f"clip_model={tmp_path / 'missing-clip'}", "strict_models=true", "logger=none", f"output_dir={tmp_path}"]))


def test_bad_runs_and_configs_fail_before_compute(runs, tmp_path):
    baseline, steered = runs
    with pytest.raises(FileNotFoundError, match="no-such-run"):
        run(compose("evaluate", [f"run={tmp_path / 'no-such-run'}", f"output_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="'run' and 'runs'"):
        run(compose("evaluate", [f"run={baseline}", f"runs=[{steered}]", f"output_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="'labels'"):
        run(compose("evaluate", [f"runs=[{baseline},{steered}]", "labels=[one]", f"output_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match="'run'"):
        run(compose("evaluate", [f"output_dir={tmp_path}"]))
    broken = make_run(tmp_path / "broken", 0.1, ids=("x",), failed=())
    record = json.loads((broken / "x.json").read_text())
    del record["target_prompt"]
    (broken / "x.json").write_text(json.dumps(record))
    with pytest.raises(RunFormatError, match=r"x\.json: missing key 'target_prompt'"):
        load_run(broken)
    record["target_prompt"], record["source_resized"] = "a cat", "gone.png"
    (broken / "x.json").write_text(json.dumps(record))
    with pytest.raises(RunFormatError, match="'source_resized' = 'gone.png' not found"):
        load_run(broken)
    record["source_resized"] = None  # falls back to the original image, resized by the evaluator
    (broken / "x.json").write_text(json.dumps(record))
    (broken / "failures.jsonl").write_text('{"id": "y", "error": "e"}\nnot json\n')
    with pytest.raises(RunFormatError, match="failures.jsonl: line 2"):
        load_run(broken)
    (broken / "failures.jsonl").write_text('{"id": "x", "error": "first attempt"}\n')
    record["subtasks"] = [{"source": "cat", "target": "dog", "box": None, "mask": None, "phrase": "cat"}]  # detected at edit time
    (broken / "x.json").write_text(json.dumps(record))
    loaded = load_run(broken)
    assert not loaded.jobs["x"].source_is_resized and loaded.failures == {}  # a resumed job counts as finished
    assert "neither 'box' nor 'mask'" in loaded.jobs["x"].regions[0].problem  # left out of masked CLIP, not an error
    record["subtasks"] = [{"source": "cat", "target": "dog", "box": [0.5, 0.1, 0.2, 0.9]}]
    (broken / "x.json").write_text(json.dumps(record))
    with pytest.raises(RunFormatError, match=r"subtasks\[0\]: 'box'"):
        load_run(broken)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunFormatError, match="no edit jobs found"):
        load_run(tmp_path / "empty")


def test_cli_evaluate_writes_into_the_hydra_run_folder(runs, tmp_path):
    baseline, _ = runs
    env = dict(os.environ, DREAMSTEER_OUTPUTS=str(tmp_path))
    ok = subprocess.run(
        [sys.executable, "-m", "dreamsteer.train", "evaluate", f"run={baseline}", "report=false", "logger=none"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    (folder,) = list((tmp_path / "evaluate").iterdir())
    saved = json.loads((folder / "metrics.json").read_text())
    assert saved["runs"][0]["num_jobs"] == 3 and "clip_model" in saved["runs"][0]["unavailable"]["clip_t"]
    assert "skipped clip_t" in ok.stderr


class _QuarterClip:
    """A stand-in CLIP with hand-computable similarities: image -> [1, mean brightness of its top-left
    quarter (the region make_run brightens)], every text -> [0, 1]."""

    @staticmethod
    def embed(image: Image.Image) -> torch.Tensor:
        w, h = image.size
        q = np.asarray(image.crop((w // 4, h // 4, w // 2, h // 2)), dtype=np.float64).mean() / 255
        return torch.nn.functional.normalize(torch.tensor([1.0, q]), dim=0)

    def images(self, images):
        return torch.stack([self.embed(im) for im in images])

    def texts(self, prompts):
        return torch.tensor([[0.0, 1.0]] * len(prompts))


def test_success_curve_and_areas_with_controlled_clip(tmp_path):
    from dreamsteer.metrics.evaluator import EvalSettings, Models, evaluate_run

    edited_run = make_run(tmp_path / "run", brighten=1.0, ids=("a", "b", "c"), failed=("d",))  # quarter turned white
    result = evaluate_run(load_run(edited_run), Models(clip=_QuarterClip()), EvalSettings())
    source = Image.open(edited_run / "a_source.png")
    e_src, e_x = _QuarterClip.embed(source), _QuarterClip.embed(Image.open(edited_run / "a.png"))
    r = float(e_x[1] / e_src[1])  # cos with the text [0, 1] is the second coordinate
    assert r > 1.4
    for job in result["jobs"].values():
        assert job["metrics"]["clip_r"] == pytest.approx(r, rel=1e-6)
    # 3 successes out of 4 attempted edits (the failed job counts) at every k
    assert result["curves"]["success_rate"] == [pytest.approx(0.75)] * 41
    assert result["areas"]["clip_auc"]["value"] == pytest.approx(0.75 * 0.40)
    l1 = result["jobs"]["a"]["metrics"]["l1"]
    assert result["areas"]["l1_star"]["value"] == pytest.approx(l1 * 0.22)
    assert result["areas"]["clip_i_star"]["value"] == pytest.approx(float(e_x @ e_src) * 0.22)
    assert result["areas"]["l1_star"]["min_count"] == 3 and "30" in result["areas"]["l1_star"]["warning"]
