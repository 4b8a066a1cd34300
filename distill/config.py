"""Editor configurations: one dataclass per method, defaults = the reference implementations' defaults
(SBP's schedule excepted: see `SBPConfig`).

Every field is a config key (`conf/editor/<method>.yaml` mirrors these defaults; a test keeps them
equal). Units: the optimizer sees ``z.grad = loss_scale / loss_divisor * g + extra`` where ``g`` is the
method's gradient (after the optional LUSD plug-ins) and ``extra`` the gradient of auxiliary losses
(PatchNCE). The references compute ``loss = (g * z).sum() / (h * w)`` for SD at 512 px (h = w = 64)
and back-propagate ``2000 * loss``, hence ``loss_scale = 2000`` and ``loss_divisor = 4096`` — a fixed
divisor (not the latent area), so the per-pixel step is the reference's at every resolution.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, List, Optional

WEIGHTINGS = ("none", "one_minus_alpha")
OPTIMIZERS = ("sgd", "adam")
PENALTY_MODES = ("auto", "always", "never")
ATTENTION_PLACES = ("down", "mid", "up")


@dataclass
class EditorConfig:
    """Keys shared by every method: the loop, timestep range, batching and the LUSD plug-ins."""

    method: str = "dds"
    steps: int = 200
    lr: float = 0.1
    optimizer: str = "sgd"  # sgd | adam
    loss_scale: float = 2000.0
    loss_divisor: float = 4096.0
    guidance: float = 7.5  # CFG scale w of eps_null + w (eps_cond - eps_null); 1 skips the null branch
    weighting: str = "none"  # w(t): none (1) | one_minus_alpha (1 - a_t)
    t_min: int = 50  # t ~ U{t_min, ..., t_max} (the references' randint(50, 949))
    t_max: int = 948
    max_batch: int = 8  # noise predictions per UNet call
    # --- LUSD plug-ins (any delta method): attention mask, gradient filtering, normalization, L2 pull
    attention_mask: bool = False
    mask_alpha: float = 0.1  # EMA: M_k = (1 - alpha) M_{k-1} + alpha M
    mask_cross_divisors: List[int] = field(default_factory=lambda: [4])  # SD 512: 16x16
    mask_self_divisors: List[int] = field(default_factory=lambda: [2])  # SD 512: 32x32
    mask_places: List[str] = field(default_factory=lambda: ["down", "mid", "up"])
    edit_tokens: Optional[List[str]] = None  # words of the target prompt; None: from the prompt difference
    keep_maps: bool = False  # debug: also materialize the self-attention maps A_S
    filter: bool = False
    filter_eta0: float = 0.01
    filter_decay: float = 0.99
    filter_max_tries: int = 100  # after this many rejections the last draw is used (and traced)
    filter_resample_t: bool = False  # the paper keeps t while resampling eps; the code resamples both
    normalize: bool = False  # g <- gamma_k g / std(g)
    gamma_low: float = 0.01
    gamma_high: float = 0.15
    gamma_speed: float = 5.0  # gamma_k = low + (high - low) (1 - sigmoid(linspace(-speed, speed, N)_k))
    reg_lambda: float = 0.0  # g <- (1 - lambda) g + lambda (z - z_src)


@dataclass
class SDSConfig(EditorConfig):
    """SDS: ``g = w(t) (eps_hat(z_t, y_tgt) - eps)``."""

    method: str = "sds"


@dataclass
class DDSConfig(EditorConfig):
    """DDS (and DDS-S / DDS-SM): ``g = M * w(t) (eps_hat(z_t, y_tgt) - eps_hat(z_t_src, y_src))``."""

    method: str = "dds"
    source_pretrained: bool = False  # DDS-S: the source branch runs with the adapter disabled
    subject_mask: Optional[str] = None  # DDS-SM: "auto" (cross-attention) or a mask image path
    subject_token: Optional[str] = None  # the subject's word(s) in the source prompt (auto mask); None: prompts.subject_words
    mask_threshold: float = 0.5
    mask_dilation: int = 0
    mask_timesteps: List[int] = field(default_factory=lambda: [100, 300, 500])
    mask_divisors: List[int] = field(default_factory=lambda: [2, 4])


@dataclass
class CDSConfig(EditorConfig):
    """CDS: DDS plus ``w_cut *`` PatchNCE between self-attention features of the source and the edit."""

    method: str = "cds"
    w_dds: float = 1.0
    w_cut: float = 3.0
    n_patches: int = 256
    patch_sizes: List[int] = field(default_factory=lambda: [1, 2])
    nce_tau: float = 0.07
    cut_places: List[str] = field(default_factory=lambda: ["up"])
    cut_divisors: Optional[List[int]] = None  # None: every self-attention layer in cut_places


@dataclass
class SBPConfig(EditorConfig):
    """SBP: ``g = w(t) (eps_hat(z_t, y_tgt) - eps_hat(z_t, y_src)) = w(t) * guidance * (eps_tgt - eps_src)``.

    The gradient is the reference's; the schedule is the editor's, not the reference script's (its 500-step
    DDIM grid for t, raw gradient with AdamW lr 0.01, 1000 steps of which 500 plain SDS, CFG 40): each
    difference and its reason in `conf/editor/sbp.yaml` and docs/editing.md."""

    method: str = "sbp"
    guidance: float = 30.0
    weighting: str = "one_minus_alpha"


@dataclass
class LUSDConfig(SBPConfig):
    """LUSD: SBP without CFG plus attention mask, filtering, normalization and the L2 pull (Alg. 1)."""

    method: str = "lusd"
    steps: int = 300
    lr: float = 1.0
    guidance: float = 1.0
    weighting: str = "none"
    attention_mask: bool = True
    filter: bool = True
    normalize: bool = True
    reg_lambda: float = 0.02


@dataclass
class PDSConfig(EditorConfig):
    """PDS: ``g = zeta_tgt - zeta_src``, ``zeta = (x_{t_prev} - mu(x_t, y)) / sigma_t`` on a DDIM grid."""

    method: str = "pds"
    guidance: float = 100.0
    pds_grid: int = 500  # timesteps t are drawn from a grid of this many steps; t_prev is the previous one
    pds_min_ratio: float = 0.02
    pds_max_ratio: float = 0.98


@dataclass
class GroundAScoreConfig(EditorConfig):
    """Ground-A-Score: per-subtask masked DDS with a null-text penalty, a full-prompt term and box PatchNCE."""

    method: str = "ground_a_score"
    steps: int = 500
    aggregate: bool = True  # one optimizer step on the summed gradients; False: the reference's K+1 steps
    full_prompt: bool = True
    beta: List[float] = field(default_factory=lambda: [0.5, 0.4, 0.3, 0.2, 0.1])  # beta_t = beta[t * len // T]
    penalty: str = "auto"  # auto: subtasks with area < penalty_area | always | never
    penalty_area: float = 0.15
    penalty_coeff: float = 5.0
    overlap_value: float = 0.3
    w_cut: float = 1.0
    n_patches: int = 256
    patch_sizes: List[int] = field(default_factory=lambda: [1, 2])
    nce_tau: float = 0.07
    cut_places: List[str] = field(default_factory=lambda: ["up"])
    cut_divisors: Optional[List[int]] = None


# method name -> schema (DDS-S and DDS-SM are DDS with their flags set; see `method_defaults`)
SCHEMAS: dict[str, type] = {
    "sds": SDSConfig,
    "dds": DDSConfig,
    "dds_s": DDSConfig,
    "dds_sm": DDSConfig,
    "cds": CDSConfig,
    "sbp": SBPConfig,
    "lusd": LUSDConfig,
    "pds": PDSConfig,
    "ground_a_score": GroundAScoreConfig,
}
METHODS = tuple(SCHEMAS)
_METHOD_FLAGS: dict[str, dict[str, Any]] = {
    "dds_s": {"source_pretrained": True},
    "dds_sm": {"source_pretrained": True, "subject_mask": "auto"},
}


def method_defaults(method: str) -> dict[str, Any]:
    """The default editor config of `method` as a plain dict (what `conf/editor/<method>.yaml` holds)."""
    if method not in SCHEMAS:
        raise ValueError(f"unknown editor method {method!r}: expected one of {list(METHODS)}")
    values = asdict(SCHEMAS[method]())
    values.update(_METHOD_FLAGS.get(method, {}))
    values["method"] = method
    return values


def field_names(method: str) -> list[str]:
    return [f.name for f in fields(SCHEMAS[method])]
