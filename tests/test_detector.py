"""The toy-world detector against the renderer's truth: clean renders, blurred + noisy + color-shifted
renders (what a generator draws), touching objects, the subject score, and its inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from dreamsteer.data.images import pil_to_tensor
from dreamsteer.data.scenes import FIXED_PATTERN_MAX, SUBJECT, SceneObject, random_scene, render, subject_scene
from dreamsteer.metrics.detector import box_iou, caption_agreement, detect, match_masks


def degrade(image: Image.Image, rng: np.random.Generator, sigma: float = 0.5, noise: float = 8.0, shift: float = 20.0) -> Image.Image:
    """Gaussian blur (sigma pixels), a color shift of up to `shift` per channel, pixel noise of std `noise`."""
    array = ndimage.gaussian_filter(np.asarray(image, np.float32), (sigma, sigma, 0))
    array = array + rng.uniform(-shift, shift, size=3) + rng.normal(0, noise, array.shape)
    return Image.fromarray(np.clip(array + 0.5, 0, 255).astype(np.uint8))


def scene_errors(scene, detection) -> list[str]:
    """Everything the detection gets wrong about the scene: background, count, and per object (matched
    by mask IoU) color, shape, subject-ness and a mask IoU of at least 0.7."""
    errors = []
    if detection.background != scene.background:
        errors.append(f"background {detection.background} != {scene.background}")
    if len(detection.objects) != len(scene.objects):
        errors.append(f"{len(detection.objects)} objects != {len(scene.objects)}")
    for d, t, iou in match_masks([o.mask for o in detection.objects], list(scene.masks)):
        got, want = detection.objects[d], scene.objects[t]
        if (got.color, got.shape, got.is_subject) != (want.color, want.shape, want.inner_color is not None) or iou < 0.7:
            errors.append(f"{got.color} {got.shape} subject={got.is_subject} (mask IoU {iou:.2f}) != {want}")
    return errors


def accuracy(count: int, degraded: bool) -> tuple[float, list[str]]:
    """Scene-level accuracy over `count` seeded scenes: 1-3 objects, every third one the subject alone."""
    rng = np.random.default_rng(0)
    wrong = []
    for i in range(count):
        scene = random_scene((1234, i), 1, 3) if i % 3 else subject_scene((1235, i))
        image = degrade(scene.image, rng) if degraded else scene.image
        errors = scene_errors(scene, detect(image))
        if errors:
            wrong.append(f"scene {i} ({scene.caption}): {errors}")
    return 1 - len(wrong) / count, wrong


def test_detector_reads_rendered_scenes():
    rate, wrong = accuracy(200, degraded=False)
    assert rate >= 0.99, wrong


def test_detector_reads_scenes_with_the_strongest_fixed_pattern():
    """`pretrain data.fixed_pattern` may go up to FIXED_PATTERN_MAX because the detector still reads such scenes."""
    wrong = []
    for i in range(60):
        scene = random_scene((1236, i), 1, 3, pattern=FIXED_PATTERN_MAX)
        errors = scene_errors(scene, detect(scene.image))
        if errors:
            wrong.append(f"scene {i} ({scene.caption}): {errors}")
    assert len(wrong) <= 1, wrong


def test_detector_reads_blurred_noisy_color_shifted_scenes():
    rate, wrong = accuracy(60, degraded=True)
    assert rate >= 0.95, wrong


@pytest.mark.slow
def test_detector_reads_degraded_scenes_at_scale():
    rate, wrong = accuracy(300, degraded=True)
    assert rate >= 0.98, wrong


def test_touching_objects_are_split_by_color():
    # the square's right side (x = 0.35 + 0.8 * 0.2) passes the circle's left edge (0.7 - 0.2): one blob
    objects = [SceneObject("square", "red", (0.35, 0.5), 0.2), SceneObject("circle", "green", (0.7, 0.5), 0.2)]
    scene = render("white", objects)
    assert ndimage.label(scene.masks.any(0))[1] == 1
    detection = detect(scene.image)
    assert [(o.color, o.shape) for o in detection.objects] == [("red", "square"), ("green", "circle")]
    for obj, box in zip(detection.objects, scene.boxes):
        assert box_iou(obj.box, box) > 0.8


def test_subject_score_needs_both_parts():
    place = ((0.5, 0.5), 0.2)
    subject = render("gray", [SceneObject(SUBJECT.shape, SUBJECT.color, *place, SUBJECT.inner_color)])
    outer_only = render("gray", [SceneObject(SUBJECT.shape, SUBJECT.color, *place)])
    inner_only = render("gray", [SceneObject(SUBJECT.shape, SUBJECT.inner_color, *place)])
    swapped = render("gray", [SceneObject(SUBJECT.shape, SUBJECT.inner_color, *place, SUBJECT.color)])
    found = detect(subject.image)
    assert found.subject_score > 0.9 and found.has_subject
    assert [(o.color, o.shape, o.inner_color) for o in found.objects] == [(SUBJECT.color, SUBJECT.shape, SUBJECT.inner_color)]
    for other in (outer_only, inner_only, swapped):
        assert detect(other.image).subject_score < 0.1


def test_subject_on_every_background_after_degradation():
    rng = np.random.default_rng(1)
    scores = [detect(degrade(subject_scene((7, i)).image, rng)).subject_score for i in range(12)]
    assert min(scores) >= 0.7, scores


def test_off_palette_color_has_no_name_and_background_is_nearest():
    scene = render("white", [SceneObject("square", "red", (0.5, 0.5), 0.2)])
    array = np.asarray(scene.image).copy()
    array[scene.masks[0]] = (110, 110, 30)  # olive: > COLOR_TOLERANCE from every object color
    detection = detect(array)
    assert detection.background == "white"
    assert [o.color for o in detection.objects] == [None]


def test_inputs_pil_uint8_and_tensor_agree_and_bad_inputs_fail():
    scene = random_scene(3, 2, 2)
    want = [(o.color, o.shape, o.box) for o in detect(scene.image).objects]
    assert want == [(o.color, o.shape, o.box) for o in detect(np.asarray(scene.image)).objects]
    assert want == [(o.color, o.shape, o.box) for o in detect(pil_to_tensor(scene.image)[None]).objects]
    with pytest.raises(ValueError, match="uint8"):
        detect(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="square"):
        detect(np.zeros((64, 32, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        detect(torch.zeros(64, 64, 3))


def test_caption_agreement_pairs_objects_and_counts():
    scene = render("black", [SceneObject("star", "red", (0.3, 0.3), 0.18), SceneObject("square", "blue", (0.7, 0.7), 0.18)])
    detection = detect(scene.image)
    assert caption_agreement(detection, scene.caption)["exact"]
    recolored = caption_agreement(detection, "a green square and a red star on a white background")
    assert recolored == {"background": False, "colors": [False, True], "shapes": [True, True], "count": True, "exact": False}
    three = caption_agreement(detection, "a blue square, a red star and a green circle on a black background")
    assert three["colors"] == [True, True, False] and three["count"] is False and not three["exact"]


def test_in_box_needs_the_color_the_shape_and_the_overlap():
    from dreamsteer.metrics.detector import Detection, DetectedObject, in_box

    def obj(color, shape, box):
        return DetectedObject(color=color, shape=shape, box=box, mask=np.zeros((16, 16), bool), pixels=50, shape_iou=0.9, color_distance=5.0, subject_score=0.0)

    # box (4, 4, 12, 12) against (6, 4, 14, 12): overlap 6 x 8 = 48, union 64 + 64 - 48 = 80, IoU 0.6
    detection = Detection("white", (255.0, 255.0, 255.0), 0.0, [obj("blue", "circle", (4, 4, 12, 12)), obj("red", "star", (6, 4, 14, 12))])
    assert in_box(detection, "red", "star", (4, 4, 12, 12))  # IoU 0.6
    assert not in_box(detection, "red", "star", (4, 4, 12, 12), min_iou=0.7)
    assert not in_box(detection, "red", "circle", (4, 4, 12, 12))  # another shape of that color in the box
    assert not in_box(detection, "blue", "star", (4, 4, 12, 12))  # another color of that shape
    assert not in_box(detection, "green", "square", (4, 4, 12, 12))  # nothing of the kind
