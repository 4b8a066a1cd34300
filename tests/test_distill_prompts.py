"""Edit tokens from the prompt difference, token columns, and the editor configs' defaults."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dreamsteer.distill.config import METHODS, method_defaults
from dreamsteer.distill.prompts import edit_words, subject_words, token_indices


@pytest.mark.parametrize("source,target,expected", [
    ("a cat", "a cat wearing a hat", ["hat"]),
    ("a cup of coffee", "a cup of matcha", ["matcha"]),
    ("a bird", "a bird on a roof", ["roof"]),
    ("a girl sitting in front of a mirror", "a girl wearing glasses sitting in front of a mirror", ["glasses"]),
    ("a waterfall", "a waterfall with a small boat floating near it", ["boat"]),
    ("a red car", "a blue car", ["car"]),  # an adjective alone extends to the following noun
    ("a photo of a cat", "a photo of a cat", []),
])
def test_edit_words(source, target, expected):
    assert edit_words(source, target) == expected


@pytest.mark.parametrize("source,target,expected", [
    ("a photo of a cat", "a photo of a sks cat", "cat"),
    ("a photo of a cat", "a photo of a sks cat wearing a hat", "cat"),
    ("a dog on the grass", "a zwx dog on the grass", "dog"),
    ("a cat sitting", "a sks cat wearing a hat", "cat"),
    ("a cat and a dog", "a cat and a sks dog", "dog"),  # the differing part's noun, not the first noun
    # words the target replaces right before the noun describe the same object: the mask reads them too
    ("a yellow circle and a red square on a cyan background", "a sks circle and a red square on a cyan background", "yellow circle"),
    ("a photo of a brown dog", "a photo of a sks dog", "brown dog"),
    ("a photo of a cat", "a photo of a <sks>", "cat"),  # a placeholder replacing the noun: the replaced word
    ("a photo of a cat next to a mirror", "a photo of a <sks> next to a mirror", "cat"),  # not a later noun
    ("a photo of a cat", "a photo of a cat", None),
])
def test_subject_words(source, target, expected):
    assert subject_words(source, target) == expected


def test_token_indices(tiny_backbone):
    tok = tiny_backbone.tokenizer
    assert token_indices(tok, "a photo of a cat wearing a hat", ["hat"]) == [8]
    assert token_indices(tok, "a cat and a cat", ["cat"]) == [2, 5]
    with pytest.raises(ValueError, match="'dog'"):
        token_indices(tok, "a photo of a cat", ["dog"])


def test_token_indices_of_the_differing_part_only(tiny_backbone):
    """LUSD masks the tokens of the part of the target that differs from the source, not every occurrence."""
    tok = tiny_backbone.tokenizer
    source, target = "a cat next to a mirror", "a cat next to a cat"
    assert edit_words(source, target) == ["cat"]
    assert token_indices(tok, target, ["cat"]) == [2, 6]  # user-named: every occurrence
    assert token_indices(tok, target, ["cat"], source) == [6]
    assert token_indices(tok, "a dog and a cat", ["dog"], "a cat and a cat") == [2]
    assert token_indices(tok, "a cat and a dog and a dog", ["dog", "dog"], "a cat") == [5, 8]  # the k-th repeat
    assert token_indices(tok, "a blue car", ["car"], "a red car") == [3]  # the span extended to its noun
    # a noun split into several tokens: all of its pieces
    pieces = tok("matcha", add_special_tokens=False).input_ids
    assert len(pieces) > 1
    assert token_indices(tok, "a cup of matcha", ["matcha"], "a cup of coffee") == list(range(4, 4 + len(pieces)))
    with pytest.raises(ValueError, match="differs"):
        token_indices(tok, "a cat next to a mirror", ["cat"], "a cat next to a dog")


def test_editor_yaml_files_hold_the_dataclass_defaults():
    conf = Path(__file__).resolve().parent.parent / "conf" / "editor"
    assert sorted(p.stem for p in conf.glob("*.yaml")) == sorted(METHODS)
    for method in METHODS:
        assert yaml.safe_load((conf / f"{method}.yaml").read_text()) == method_defaults(method), method


def test_reference_defaults():
    lusd, dds, gas = method_defaults("lusd"), method_defaults("dds"), method_defaults("ground_a_score")
    assert (lusd["steps"], lusd["lr"], lusd["reg_lambda"], lusd["mask_alpha"], lusd["filter_eta0"], lusd["guidance"]) == (300, 1.0, 0.02, 0.1, 0.01, 1.0)
    assert (dds["steps"], dds["lr"], dds["loss_scale"], dds["guidance"], dds["t_min"], dds["t_max"]) == (200, 0.1, 2000.0, 7.5, 50, 948)
    assert (gas["steps"], gas["beta"], gas["penalty_area"], gas["penalty_coeff"], gas["overlap_value"]) == (500, [0.5, 0.4, 0.3, 0.2, 0.1], 0.15, 5.0, 0.3)
    assert method_defaults("dds_sm")["subject_mask"] == "auto" and method_defaults("dds_s")["source_pretrained"]
    assert method_defaults("cds")["w_cut"] == 3.0 and method_defaults("pds")["guidance"] == 100.0


def test_lusd_editor_masks_the_changed_occurrence_only(tiny_backbone):
    import torch

    from dreamsteer.distill.editor import Editor, editor_config

    editor = Editor(tiny_backbone, editor_config(method_defaults("lusd")), "a cat next to a mirror", "a cat next to a cat",
                    torch.zeros(1, 4, 16, 16))
    assert editor.tokens == ["cat"] and list(editor.recorder.token_indices) == [6]
    named = Editor(tiny_backbone, editor_config(method_defaults("lusd") | {"edit_tokens": ["cat"]}), "a cat next to a mirror",
                   "a cat next to a cat", torch.zeros(1, 4, 16, 16))
    assert list(named.recorder.token_indices) == [2, 6]  # user-named tokens: every occurrence
