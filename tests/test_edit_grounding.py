"""Automatic Ground-A-Score boxes from phrases through a local transformers zero-shot detector (a tiny
random OWLv2 saved in the test; nothing is downloaded)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from dreamsteer.train.config import compose


@pytest.fixture(scope="module")
def owl_dir(tmp_path_factory, tiny_dir) -> Path:
    from transformers import CLIPTokenizer, Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    tok = CLIPTokenizer.from_pretrained(str(tiny_dir / "tokenizer"))
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=64, patch_size=16)
    torch.manual_seed(0)
    model = Owlv2ForObjectDetection(Owlv2Config(text_config=text, vision_config=vision, projection_dim=32))
    folder = tmp_path_factory.mktemp("owlv2")
    model.save_pretrained(folder)
    Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": 64, "width": 64}), tokenizer=tok).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def cat_png(tmp_path_factory) -> Path:
    from dreamsteer.data.samples import write_sample_images

    return write_sample_images(tmp_path_factory.mktemp("img"), ["cat"])[0]


def test_detect_boxes_format_and_threshold(owl_dir, cat_png):
    from dreamsteer.distill.grounding import detect_boxes

    image = Image.open(cat_png).convert("RGB").resize((128, 128))
    boxes = detect_boxes(image, ["hat", "cat"], str(owl_dir), threshold=0.0)
    assert len(boxes) == 2 and boxes[0] is not None
    for box in boxes:
        if box is not None:
            assert all(0.0 <= v <= 1.0 for v in box) and box[2] > box[0] and box[3] > box[1]
    assert detect_boxes(image, ["hat", "cat"], str(owl_dir), threshold=1.01) == [None, None]


@pytest.fixture(scope="module")
def grounding_dino_dir(tmp_path_factory) -> Path:
    from transformers import (BertConfig, BertTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor, SwinConfig)

    folder = tmp_path_factory.mktemp("grounding_dino")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "cat", "hat", "dog", "a", "photo", "of"]
    (folder / "vocab.txt").write_text("\n".join(words))
    swin = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4,
                      out_features=["stage1", "stage2"])
    bert = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64)
    cfg = GroundingDinoConfig(backbone_config=swin, text_config=bert, d_model=32, encoder_layers=1, decoder_layers=2,
                              encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=2, decoder_attention_heads=2,
                              num_queries=10, num_feature_levels=2, encoder_n_points=2, decoder_n_points=2, max_text_len=16,
                              use_timm_backbone=False)
    torch.manual_seed(0)
    GroundingDinoForObjectDetection(cfg).save_pretrained(folder)
    processor = GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}),
                                       tokenizer=BertTokenizer(str(folder / "vocab.txt")))
    processor.save_pretrained(folder)
    return folder


def test_grounding_dino_path(grounding_dino_dir, cat_png):
    from dreamsteer.distill.grounding import detect_boxes

    image = Image.open(cat_png).convert("RGB").resize((128, 128))
    boxes = detect_boxes(image, ["cat", "hat"], str(grounding_dino_dir), threshold=0.0, text_threshold=0.0)
    assert len(boxes) == 2 and any(b is not None for b in boxes)
    for box in boxes:
        if box is not None:
            assert all(0.0 <= v <= 1.0 for v in box) and box[2] > box[0] and box[3] > box[1]
    assert detect_boxes(image, ["cat", "hat"], str(grounding_dino_dir), threshold=1.01) == [None, None]


def test_detector_folder_errors(tmp_path):
    from dreamsteer.distill.grounding import GroundingError, detect_boxes

    with pytest.raises(GroundingError, match="not a folder"):
        detect_boxes(Image.new("RGB", (64, 64)), ["cat"], str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(GroundingError, match="empty"):
        detect_boxes(Image.new("RGB", (64, 64)), ["cat"], str(tmp_path / "empty"))


def test_edit_with_detected_box_and_missing_detection(owl_dir, cat_png, tmp_path):
    from dreamsteer.distill.grounding import detect_boxes
    from dreamsteer.distill.masks import box_region
    from dreamsteer.train.edit import run

    sub = "[{source: hat, target: crown}]"
    args = [f"image={cat_png}", "source_prompt=a photo of a cat", "target_prompt=a photo of a cat", "editor=ground_a_score",
            "editor.steps=1", f"subtasks={sub}", f"grounding.model={owl_dir}", "grounding.threshold=0.0", "progress=false"]
    record = run(compose("edit", [*args, f"output_dir={tmp_path / 'ok'}"]))
    source = Image.open(record["source_resized"]).convert("RGB")
    (expected,) = detect_boxes(source, ["hat"], str(owl_dir), threshold=0.0)
    assert record["subtask_boxes"] == [list(box_region(expected, (16, 16)).box)]
    assert json.loads((tmp_path / "ok" / "edit.json").read_text())["mask"]

    with pytest.raises(ValueError, match=r"subtasks\[0\].*no box for 'hat'"):
        run(compose("edit", [*args[:-2], "grounding.threshold=1.01", "progress=false", f"output_dir={tmp_path / 'none'}"]))
    with pytest.raises(ValueError, match=r"subtasks\[0\].*grounding.model"):
        run(compose("edit", [*args[:6], "progress=false", f"output_dir={tmp_path / 'nomodel'}"]))
