"""The toy world's scene renderer: determinism, truth consistent with pixels, captions in the grammar."""
import itertools

import numpy as np
import pytest

from dreamsteer.data.scenes import (
    BACKGROUND_COLORS,
    OBJECT_COLORS,
    RESOLUTION,
    SHAPES,
    SUBJECT,
    SceneDataset,
    SceneObject,
    collate_scenes,
    fixed_pattern,
    make_caption,
    parse_caption,
    random_scene,
    render,
    subject_scene,
    write_subject_photos,
)


def test_same_seed_same_scene_and_different_seeds_differ():
    a, b, c = random_scene(7), random_scene(7), random_scene(8)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image)) and a.caption == b.caption
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))
    dataset = SceneDataset(4, seed=3)
    assert dataset[2]["caption"] == SceneDataset(4, seed=3)[2]["caption"] == random_scene((3, 2)).caption


def test_colors_are_far_apart():
    colors = {**OBJECT_COLORS, **BACKGROUND_COLORS}
    assert not set(OBJECT_COLORS) & set(BACKGROUND_COLORS)
    for a, b in itertools.combinations(colors, 2):
        assert np.linalg.norm(np.subtract(colors[a], colors[b])) >= 115, (a, b)


@pytest.mark.parametrize("seed", range(12))
def test_masks_boxes_and_colors_match_the_pixels(seed):
    scene = random_scene(seed, 1, 3)
    pixels = np.asarray(scene.image).astype(int)
    background = np.array(BACKGROUND_COLORS[scene.background])
    union = scene.masks.any(0)
    assert not (scene.masks.sum(0) > 1).any()  # objects never overlap
    # outside every mask and away from edges, the image is the background color exactly (+-1 rounding)
    far = ~union
    for dy, dx in itertools.product(range(-2, 3), repeat=2):
        far &= ~np.roll(np.roll(union, dy, 0), dx, 1)
    assert np.abs(pixels[far] - background).max() <= 1
    for obj, mask, box in zip(scene.objects, scene.masks, scene.boxes):
        x0, y0, x1, y1 = box
        ys, xs = np.nonzero(mask)
        assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        # the box sits where the object was placed: its center within 2 px of the shape's center
        cx, cy = obj.center[0] * RESOLUTION, obj.center[1] * RESOLUTION
        assert abs((x0 + x1) / 2 - cx) <= 2 and abs((y0 + y1) / 2 - cy) <= 2
        # the mask's interior pixels are the object's color; the median over the mask is too
        assert np.abs(np.median(pixels[mask], 0) - OBJECT_COLORS[obj.color]).max() <= 1


def test_shapes_have_their_expected_fill_of_the_box():
    # independent check of the geometry: area / box area for each shape drawn big
    expected = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "star": 0.4}
    for shape in SHAPES:
        scene = render("white", [SceneObject(shape, "red", (0.5, 0.5), 0.4)])
        x0, y0, x1, y1 = scene.boxes[0]
        fill = scene.masks[0].sum() / ((x1 - x0) * (y1 - y0))
        assert abs(fill - expected[shape]) < 0.06, (shape, fill)


@pytest.mark.parametrize("seed", range(20))
def test_caption_matches_truth(seed):
    scene = random_scene(seed, 1, 3)
    background, objects = parse_caption(scene.caption)
    assert background == scene.background
    assert objects == [(o.color, o.shape) for o in scene.objects]


def test_caption_grammar_and_parse_errors():
    objs = [SceneObject("circle", "red", (0.3, 0.3), 0.1), SceneObject("square", "blue", (0.7, 0.7), 0.1)]
    assert make_caption("white", objs) == "a red circle and a blue square on a white background"
    three = objs + [SceneObject("star", "green", (0.3, 0.8), 0.1)]
    assert make_caption("black", three) == "a red circle, a blue square and a green star on a black background"
    with pytest.raises(ValueError, match="background"):
        parse_caption("a red circle on a mauve background")
    with pytest.raises(ValueError, match="a <color> <shape>"):
        parse_caption("a red hexagon on a white background")


def test_subject_scene_and_photos(tmp_path):
    scene = subject_scene(0)
    assert scene.caption.startswith(f"a {SUBJECT.token} {SUBJECT.class_word} on a ")
    obj, mask = scene.objects[0], scene.masks[0]
    pixels = np.asarray(scene.image).astype(int)
    cx, cy = int(obj.center[0] * RESOLUTION), int(obj.center[1] * RESOLUTION)
    assert np.abs(pixels[cy, cx] - OBJECT_COLORS[SUBJECT.inner_color]).max() <= 1  # the center is the inner color
    x0, y0, x1, y1 = scene.boxes[0]
    assert np.abs(pixels[(y0 + y1) // 2, x0 + 1] - OBJECT_COLORS[SUBJECT.color]).max() <= 1  # the rim the outer color
    paths = write_subject_photos(tmp_path, count=3, seed=1, token="<sks>")
    assert [p.name for p in paths] == ["subject_00.png", "subject_01.png", "subject_02.png"]
    assert paths[0].with_suffix(".txt").read_text().startswith("a <sks> circle on a ")


def test_two_tone_objects():
    plain = [random_scene(s) for s in range(20)]
    assert all(o.inner_color is None for sc in plain for o in sc.objects)
    assert [sc.caption for sc in plain] == [random_scene(s, two_tone_p=0.0).caption for s in range(20)]  # same draws
    scenes = [random_scene(s, two_tone_p=1.0) for s in range(20)]
    for scene in scenes:
        pixels = np.asarray(scene.image).astype(int)
        for obj in scene.objects:
            assert obj.inner_color is not None and obj.inner_color != obj.color
            cx, cy = int(obj.center[0] * RESOLUTION), int(obj.center[1] * RESOLUTION)
            assert np.abs(pixels[cy, cx] - OBJECT_COLORS[obj.inner_color]).max() <= 1
            named = f"{SUBJECT.token} {SUBJECT.class_word}" if obj.is_subject else f"{obj.color} {obj.shape} with a {obj.inner_color} center"
            assert f"a {named}" in scene.caption
    subject = SceneObject(SUBJECT.shape, SUBJECT.color, (0.5, 0.5), 0.2, SUBJECT.inner_color)
    other = SceneObject(SUBJECT.shape, "red", (0.5, 0.5), 0.2, SUBJECT.inner_color)
    assert subject.phrase == f"{SUBJECT.token} {SUBJECT.class_word}"
    assert other.phrase == f"red {SUBJECT.shape} with a {SUBJECT.inner_color} center"


def test_two_tone_objects_can_leave_out_the_subjects_colors_the_subject_alone_or_its_shape():
    def drawn(leave_out):
        return {(o.shape, o.color, o.inner_color) for s in range(600)
                for o in random_scene(s, two_tone_p=1.0, leave_out=leave_out).objects}

    subject = (SUBJECT.shape, SUBJECT.color, SUBJECT.inner_color)
    pair_on = {(shape, SUBJECT.color, SUBJECT.inner_color) for shape in SHAPES}  # the subject's colors on every shape
    everything, no_pair, no_subject = drawn("nothing"), drawn("subject_colors"), drawn("subject")
    no_shape = drawn("subject_shape")
    assert len(everything) == len(SHAPES) * len(OBJECT_COLORS) * (len(OBJECT_COLORS) - 1)
    assert everything - no_pair == pair_on  # on no shape; every other object still drawn
    assert everything - no_subject == {subject}  # the pair on the other shapes is drawn, the subject is not
    # the subject's shape only in one color; every two-tone object of the other shapes still drawn
    assert no_shape == {o for o in everything if o[0] != SUBJECT.shape} | {(SUBJECT.shape, c, None) for c in OBJECT_COLORS}
    assert not any(o.is_subject for s in range(600) for o in random_scene(s, two_tone_p=1.0, leave_out="subject").objects)
    with pytest.raises(ValueError, match="leave_out"):
        random_scene(0, two_tone_p=1.0, leave_out="colors")


def test_collate_keeps_ragged_truth():
    batch = collate_scenes([SceneDataset(3, seed=0, min_objects=1, max_objects=3)[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, RESOLUTION, RESOLUTION)
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
    assert all(len(p) == len(b) for p, b in zip(batch["phrases"], batch["boxes"]))


def test_position_words_name_the_third_each_object_center_lies_in():
    objects = [SceneObject("circle", "red", (0.2, 0.25), 0.14), SceneObject("square", "blue", (0.8, 0.5), 0.14),
               SceneObject("star", "green", (0.5, 0.8), 0.14)]
    assert make_caption("white", objects, positions=True) == \
        "a red circle top left, a blue square right and a green star bottom on a white background"
    assert make_caption("black", [SceneObject("triangle", "purple", (0.5, 0.5), 0.2)], positions=True) == \
        "a purple triangle middle on a black background"
    assert make_caption("white", objects) == "a red circle, a blue square and a green star on a white background"


def test_position_words_change_the_caption_alone_at_their_rate():
    """The same seed gives the same scene for every position_words_p (the draw comes last); the caption
    names the places in about that share of scenes."""
    named = 0
    for i in range(200):
        plain, placed = random_scene((5, i)), random_scene((5, i), position_words_p=0.5)
        assert plain.objects == placed.objects and plain.background == placed.background
        assert np.array_equal(np.asarray(plain.image), np.asarray(placed.image))
        assert placed.caption in (plain.caption, make_caption(plain.background, plain.objects, positions=True))
        named += placed.caption != plain.caption
    assert 70 <= named <= 130
    assert all(random_scene((6, i), position_words_p=1.0).caption == make_caption(s.background, s.objects, positions=True)
               for i, s in ((i, random_scene((6, i))) for i in range(5)))


def _pattern_seen(amplitude: float, **kwargs) -> np.ndarray:
    """The offset the pattern adds to each pixel and channel, read off rendered scenes (with and without
    it) where neither value was clipped; NaN where every scene clipped. Checks on the way that every
    scene shows the same offset and keeps its objects, masks, boxes and caption."""
    offsets = []
    for i in range(6):
        plain, patterned = random_scene((9, i)), random_scene((9, i), pattern=amplitude, **kwargs)
        assert plain.objects == patterned.objects and plain.caption == patterned.caption
        assert np.array_equal(plain.masks, patterned.masks) and np.array_equal(plain.boxes, patterned.boxes)
        a, b = np.asarray(plain.image).astype(int), np.asarray(patterned.image).astype(int)
        unclipped = (a >= amplitude + 1) & (a <= 254 - amplitude)  # neither this pixel nor its offset clipped at 0 / 255
        offsets.append(np.where(unclipped, b - a, 999))
    offsets = np.stack(offsets)
    # Per pixel and channel, every image where it was not clipped shows the same offset (to rounding).
    seen = offsets != 999
    lo, hi = np.where(seen, offsets, 999).min(0), np.where(seen, offsets, -999).max(0)
    assert (hi - lo)[seen.any(0)].max() <= 1
    return np.where(seen.any(0), np.where(seen, offsets, 0).sum(0) / np.maximum(seen.sum(0), 1), np.nan)


def _spread_within_cells(d: np.ndarray, cell: int) -> float:
    cells = d.reshape(RESOLUTION // cell, cell, RESOLUTION // cell, cell, 3)
    return float(np.nanmax(np.abs(cells - np.nanmean(cells, axis=(1, 3), keepdims=True))))


def test_fixed_pattern_is_the_same_offset_in_every_image_and_changes_nothing_else():
    """`pattern=A` adds one texture to every scene: cells of 2x2 pixels, one value per cell and channel in
    [-A, A], different from cell to cell; the objects, masks, boxes and caption stay as drawn without it."""
    amplitude = 16.0
    d = _pattern_seen(amplitude)
    assert np.nanmax(np.abs(d)) <= amplitude + 1 and np.nanstd(d) > amplitude / 3  # uniform in [-A, A]: std A / sqrt(3)
    assert _spread_within_cells(d, 2) <= 1  # one value per 2x2 cell
    pattern = fixed_pattern(RESOLUTION, amplitude)
    assert pattern.shape == (RESOLUTION, RESOLUTION, 3) and np.nanmax(np.abs(d - pattern)) <= 1
    assert np.array_equal(fixed_pattern(RESOLUTION, 2 * amplitude), 2 * pattern)
    assert np.array_equal(np.asarray(random_scene((9, 0), pattern=0.0).image), np.asarray(random_scene((9, 0)).image))
    item = SceneDataset(2, seed=9, pattern=amplitude)[1]
    assert np.array_equal(np.asarray(random_scene((9, 1), pattern=amplitude).image),
                          np.round((item["pixel_values"].permute(1, 2, 0).numpy() + 1) * 127.5).astype(int))


def test_fixed_pattern_cell_sets_the_size_of_its_cells():
    d = _pattern_seen(16.0, pattern_cell=4)
    assert _spread_within_cells(d, 4) <= 1  # one value per 4x4 cell
    assert _spread_within_cells(d, 8) > 8  # and not one per 8x8: neighbouring cells differ
    assert np.nanmax(np.abs(d - fixed_pattern(RESOLUTION, 16.0, 4))) <= 1
    with pytest.raises(ValueError, match="cell"):
        fixed_pattern(RESOLUTION, 16.0, 0)
    item = SceneDataset(2, seed=9, pattern=16.0, pattern_cell=4)[1]
    assert np.array_equal(np.asarray(random_scene((9, 1), pattern=16.0, pattern_cell=4).image),
                          np.round((item["pixel_values"].permute(1, 2, 0).numpy() + 1) * 127.5).astype(int))
