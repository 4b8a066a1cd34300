"""benchmarks.subject_reach: the freed positions and spaces against the text encoder run here on other words,
the fit against a noise error computed here, the probe end to end on the built-in toy model."""
from __future__ import annotations

import json

import pytest
import torch

from dreamsteer.benchmarks.subject_reach import conditioning, fit, initial_vectors, learned_positions, main, subject_latents, subject_prompt
from dreamsteer.diffusion.backbone import load_backbone


@pytest.fixture(scope="module")
def toy():
    return load_backbone("toy").freeze()


def test_learned_positions_are_the_phrase_words_tokens(toy):
    ids = toy.tokenize([subject_prompt("blue circle with a yellow center", "white")])[0]
    positions = learned_positions(toy.tokenizer, "blue circle with a yellow center", ["blue", "yellow"])
    assert toy.tokenizer.convert_ids_to_tokens(ids[positions].tolist()) == ["blue</w>", "yellow</w>"]
    with pytest.raises(ValueError, match="not in the phrase"):
        learned_positions(toy.tokenizer, "sks circle", ["square"])
    with pytest.raises(ValueError, match="single tokens"):
        learned_positions(toy.tokenizer, "sks circlex", ["sks"])


def test_input_space_is_the_encoder_run_on_other_words(toy):
    # Input embeddings of "red" and "star" at the places of "sks" and "circle" must give exactly what the
    # encoder gives for the prompt written with those words.
    ids = toy.tokenize([subject_prompt("sks circle", "gray")])
    positions = learned_positions(toy.tokenizer, "sks circle", ["sks", "circle"])
    table = toy.text_encoder.get_input_embeddings().weight
    words = [toy.tokenizer(w, add_special_tokens=False).input_ids[0] for w in ("red", "star")]
    encode = conditioning(toy, "input", positions, table[words].detach().clone(), ids)
    with torch.no_grad():
        expected = toy.text_encoder(toy.tokenize([subject_prompt("red star", "gray")]))[0]
        assert torch.allclose(encode(), expected, atol=1e-6)
        assert not torch.allclose(toy.text_encoder(ids)[0], expected, atol=1e-3)  # the words matter


def test_output_space_replaces_only_the_freed_hidden_states(toy):
    ids = toy.tokenize([subject_prompt("sks circle", "black"), subject_prompt("sks circle", "cyan")])
    positions = learned_positions(toy.tokenizer, "sks circle", ["sks"])
    vectors = torch.randn(1, toy.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = toy.text_encoder(ids)[0]
        encoded = conditioning(toy, "output", positions, vectors, ids)()
    assert torch.equal(encoded[:, 2], vectors.expand(2, -1))
    keep = [i for i in range(ids.shape[1]) if i != 2]
    assert torch.equal(encoded[:, keep], plain[:, keep])
    assert torch.allclose(initial_vectors(toy, "output", ids, positions), plain[0, [2]])
    with pytest.raises(ValueError, match="space"):
        conditioning(toy, "embedding", positions, vectors, ids)


def test_fit_moves_only_the_vectors_and_lowers_the_noise_error(toy):
    latents, backgrounds = subject_latents(toy, 3, seed=7)
    ids = toy.tokenize([subject_prompt("sks circle", b) for b in backgrounds])
    positions = learned_positions(toy.tokenizer, "sks circle", ["sks"])
    vectors = initial_vectors(toy, "output", ids, positions).requires_grad_(True)
    start = vectors.detach().clone()
    encode = conditioning(toy, "output", positions, vectors, ids.repeat(2, 1))
    unet_before = {k: v.clone() for k, v in toy.unet.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    eps, t = torch.randn(latents.shape, generator=g), torch.tensor([300, 600, 900])

    def error(v: torch.Tensor) -> float:  # the epsilon error with `v` at "sks", written out here
        with torch.no_grad():
            hidden = toy.text_encoder(ids)[0].clone()
            hidden[:, 2] = v[0]
            a = toy.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
            z_t = a.sqrt() * latents + (1 - a).sqrt() * eps
            return torch.nn.functional.mse_loss(toy.unet(z_t, t, hidden).sample, eps).item()

    losses = fit(toy, encode, vectors, latents.repeat(2, 1, 1, 1), steps=60, lr=2e-2, seed=0, progress=False)
    assert len(losses) == 60
    assert not torch.equal(vectors.detach(), start)
    assert all(torch.equal(v, unet_before[k]) for k, v in toy.unet.state_dict().items())
    assert error(vectors.detach()) < error(start)


def test_main_writes_the_rate_and_a_grid(toy, tmp_path):
    result = main(["--model", "toy", "--space", "input", "--learn", "sks", "--steps", "2", "--per-background", "1", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "input_sks.json").read_text())
    assert written == result
    assert written["samples"] == 4 and set(written["by_background"]) == {"white", "black", "gray", "cyan"}
    assert (tmp_path / "input_sks.png").is_file()
    base = main(["--model", "toy", "--learn", "--per-background", "1", "--out", str(tmp_path)])
    assert base["loss_last_100"] is None and (tmp_path / "output_none.json").is_file()
