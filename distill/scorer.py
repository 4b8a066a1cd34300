"""Batched scoring: many noise predictions, as few UNet calls as possible.

A score-distillation step needs several noise predictions: CFG's null and conditional branches, the
source and target branches of DDS, the K subtasks of Ground-A-Score, and for DDS-S the pre-trained
model next to the personalized one. Each is a `ScoreRequest`; `Scorer` groups the requests by
adapter state (the pre-trained model is the same UNet inside ``backbone.adapter_disabled()``, so no
second UNet is held in memory), concatenates each group along the batch axis (per-row timesteps and
embeddings) in chunks of at most ``max_batch`` rows, runs one UNet call per chunk and splits the result.

When an `AttentionRecorder` is attached, the rows of requests marked ``record=True`` are copied out of
the recorder right after their call (`Capture`), so what a method needs from one branch survives the
other calls of the step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from dreamsteer.distill.attention import AttentionRecorder


@dataclass
class ScoreRequest:
    """One noise prediction ``eps(latent, t, emb)``; ``pretrained`` runs it with the adapter disabled."""

    latent: torch.Tensor  # [1, C, h, w] noised latent (may carry an autograd graph)
    t: torch.Tensor  # scalar or [1] integer timestep
    emb: torch.Tensor  # [1, L, D] text embedding
    pretrained: bool = False
    record: bool = False


@dataclass
class Capture:
    """What the attention recorder saw for one request row (each tensor has batch size 1)."""

    cross_maps: dict[str, torch.Tensor] = field(default_factory=dict)
    features: dict[str, torch.Tensor] = field(default_factory=dict)
    qk: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)
    maps: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Scores:
    """The predictions, in request order, and the captures of recorded requests (by request index)."""

    eps: list[torch.Tensor]
    captures: dict[int, Capture]


class Scorer:
    """Runs `ScoreRequest`s through the backbone's UNet in grouped, batched calls.

    ``calls`` counts UNet calls and ``rows`` predicted rows (for tests and benchmarks).
    """

    def __init__(self, backbone, max_batch: int = 8, recorder: AttentionRecorder | None = None):
        if max_batch < 1:
            raise ValueError(f"editor key 'max_batch': must be >= 1, got {max_batch}")
        self.backbone = backbone
        self.max_batch = int(max_batch)
        self.recorder = recorder
        self.calls = 0
        self.rows = 0

    def adapter_matters(self) -> bool:
        """Whether the adapter changes the UNet (Textual Inversion only changes prompt embeddings)."""
        adapter = self.backbone.adapter
        return adapter is not None and getattr(adapter, "kind", None) != "textual_inversion"

    def __call__(self, requests: Sequence[ScoreRequest]) -> Scores:
        if not requests:
            return Scores([], {})
        split = self.adapter_matters()
        groups: dict[bool, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(bool(request.pretrained) and split, []).append(i)
        eps: list[torch.Tensor | None] = [None] * len(requests)
        captures: dict[int, Capture] = {}
        for pretrained, members in groups.items():
            for start in range(0, len(members), self.max_batch):
                chunk = members[start : start + self.max_batch]
                out = self._call([requests[i] for i in chunk], pretrained)
                for row, i in enumerate(chunk):
                    eps[i] = out[row : row + 1]
                    if requests[i].record and self.recorder is not None:
                        captures[i] = self._capture(row)
                if self.recorder is not None:
                    self.recorder.clear()
        return Scores(eps, captures)  # type: ignore[arg-type]

    def _call(self, chunk: list[ScoreRequest], pretrained: bool) -> torch.Tensor:
        bb = self.backbone
        latents = chunk[0].latent if len(chunk) == 1 else torch.cat([r.latent for r in chunk])
        t = torch.stack([r.t.reshape(()) for r in chunk]).to(bb.device)
        emb = chunk[0].emb if len(chunk) == 1 else torch.cat([r.emb for r in chunk])
        self.calls += 1
        self.rows += len(chunk)
        if pretrained:
            with bb.adapter_disabled():
                return bb.predict_eps(latents, t, emb).float()
        return bb.predict_eps(latents, t, emb).float()

    def _capture(self, row: int) -> Capture:
        rec = self.recorder
        assert rec is not None
        sl = slice(row, row + 1)
        return Capture(
            cross_maps={k: v[sl] for k, v in rec.cross_maps.items()},
            features={k: v[sl] for k, v in rec.features.items()},
            qk={k: (q[sl], kk[sl], s) for k, (q, kk, s) in rec.qk.items()},
            maps={k: v[sl] for k, v in rec.maps.items()},
        )
