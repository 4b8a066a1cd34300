"""Caption dropout and tag shuffling with keep-first-N tags."""
from __future__ import annotations

import pytest
import torch

from dreamsteer.data.samples import write_subject_set
from dreamsteer.data.subject import Concept, SubjectDataError, SubjectDataset, read_instance_items, validate_subject_data
from dreamsteer.train.config import compose

PROMPT = "sks cat, sitting, on grass, sunny, photo"


def test_dropout_and_shuffle_change_only_the_prompts(tmp_path):
    write_subject_set(tmp_path / "subject", "cat", count=2)
    items = read_instance_items(tmp_path / "subject")
    with_class = Concept(items, PROMPT, class_paths=[items[0].path], class_prompt="a cat, photo")
    plain = SubjectDataset([with_class], 64, center_crop=False)
    dropped = SubjectDataset([with_class], 64, center_crop=False, caption_dropout=0.3)
    shuffled = SubjectDataset([Concept(items, PROMPT)], 64, center_crop=False, shuffle_captions=True, keep_tokens=1)

    n = 200
    drops = [dropped[i]["prompt"] == "" for i in range(n)]
    assert 0.2 < sum(drops) / n < 0.4
    assert all(dropped[i]["prompt"] == PROMPT for i in range(n) if not drops[i])
    assert all(dropped[i]["class_prompt"] == "a cat, photo" for i in range(20))  # class prompts are kept

    tags = PROMPT.split(", ")
    seen = set()
    for i in range(40):
        prompt = shuffled[i]["prompt"]
        parts = prompt.split(", ")
        assert parts[0] == "sks cat" and sorted(parts) == sorted(tags)  # the first tag stays, none is lost
        assert prompt == shuffled[i]["prompt"]  # a function of the example index
        seen.add(prompt)
    assert len(seen) > 10
    # crops, flips and the class stream are those of the plain dataset: the caption draws use their own generator
    for i in range(6):
        for other in (dropped, shuffled):
            assert torch.equal(other[i]["pixel_values"], plain[i]["pixel_values"])
        assert torch.equal(dropped[i]["class_pixel_values"], plain[i]["class_pixel_values"])
        assert plain[i]["prompt"] == PROMPT


def test_caption_keys_are_checked(tmp_path):
    write_subject_set(tmp_path / "subject", "cat", count=1)
    base = [f"data.instance_dir={tmp_path / 'subject'}", "data.instance_prompt='a photo of sks cat'"]
    with pytest.raises(SubjectDataError, match="data.caption_dropout"):
        validate_subject_data(compose("personalize", [*base, "data.caption_dropout=1.0"]).data)
    with pytest.raises(SubjectDataError, match="data.keep_tokens"):
        validate_subject_data(compose("personalize", [*base, "data.keep_tokens=-1"]).data)
