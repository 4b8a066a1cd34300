"""LPIPS (Zhang et al. 2018) in plain torch, loaded from one local safetensors file.

    LPIPS(x, y) = sum_l  mean_{h,w}  w_l . (f_l(x)_hw - f_l(y)_hw)^2,   f_l = phi_l / ||phi_l||_channels

phi_l are the ReLU outputs of 5 stages of an ImageNet backbone (AlexNet: conv1..conv5; VGG16:
relu1_2, relu2_2, relu3_3, relu4_3, relu5_3) applied to the input after LPIPS's scaling layer
((x - shift) / scale, inputs in [-1, 1]); w_l are the learned non-negative 1x1 "linear" heads (v0.1).

torchvision (which the `lpips` package builds its backbones from) cannot be used here, so the
backbones are rebuilt layer by layer with the exact module indices of `torchvision.models.*.features`,
and parameter names follow the `lpips` package (`net.slice1.0.weight`, `lin0.model.1.weight`,
`scaling_layer.shift`): a safetensors file saved from `lpips.LPIPS(net=...).state_dict()` loads as is.
`convert_lpips_weights` builds that file from the two usual downloads (torchvision's backbone
checkpoint and the lpips repo's `weights/v0.1/<net>.pth` heads). No weights are ever downloaded here.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

# (kind, args) per torchvision `features` index; slices are the index ranges ending at each tapped ReLU.
_ALEX_LAYERS = [
    ("conv", 3, 64, 11, 4, 2), ("relu",), ("pool", 3, 2),
    ("conv", 64, 192, 5, 1, 2), ("relu",), ("pool", 3, 2),
    ("conv", 192, 384, 3, 1, 1), ("relu",),
    ("conv", 384, 256, 3, 1, 1), ("relu",),
    ("conv", 256, 256, 3, 1, 1), ("relu",),
]  # fmt: skip
_ALEX_SLICES = [(0, 2), (2, 5), (5, 8), (8, 10), (10, 12)]
_ALEX_CHANNELS = [64, 192, 384, 256, 256]


def _vgg16_layers() -> list[tuple]:
    layers: list[tuple] = []
    in_ch = 3
    for out_ch in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512):
        if out_ch == "M":
            layers.append(("pool", 2, 2))
        else:
            layers += [("conv", in_ch, out_ch, 3, 1, 1), ("relu",)]
            in_ch = out_ch
    return layers


_VGG_SLICES = [(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)]
_VGG_CHANNELS = [64, 128, 256, 512, 512]

NETS = {
    "alex": (_ALEX_LAYERS, _ALEX_SLICES, _ALEX_CHANNELS),
    "vgg": (_vgg16_layers(), _VGG_SLICES, _VGG_CHANNELS),
}


class LPIPSWeightsError(ValueError):
    """An LPIPS weights file that cannot be used; the message names the file and what is wrong."""


def _make_layer(spec: tuple) -> nn.Module:
    if spec[0] == "conv":
        _, cin, cout, k, stride, pad = spec
        return nn.Conv2d(cin, cout, k, stride=stride, padding=pad)
    if spec[0] == "pool":
        return nn.MaxPool2d(spec[1], stride=spec[2])
    return nn.ReLU()


class _Backbone(nn.Module):
    """torchvision's `features` cut into the 5 LPIPS slices, keeping torchvision's layer indices."""

    def __init__(self, net: str):
        super().__init__()
        layers, slices, _ = NETS[net]
        for s, (lo, hi) in enumerate(slices, start=1):
            block = nn.Sequential()
            for i in range(lo, hi):
                block.add_module(str(i), _make_layer(layers[i]))
            setattr(self, f"slice{s}", block)
        self.num_slices = len(slices)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for s in range(1, self.num_slices + 1):
            x = getattr(self, f"slice{s}")(x)
            outs.append(x)
        return outs


class _ScalingLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class _LinearHead(nn.Module):
    """A 1x1 conv without bias; kept inside `model` at index 1 (index 0 is lpips' train-time dropout)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential()
        self.model.add_module("1", nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LPIPS(nn.Module):
    """Learned Perceptual Image Patch Similarity, v0.1 (Zhang et al. 2018):

        d(x, y) = sum_l (1 / H_l W_l) sum_{h,w} || w_l * (f_l(x)_hw - f_l(y)_hw) ||^2

    where f_l is the backbone's stage-l activation normalized to unit length over channels
    (eps 1e-10) and w_l the learned per-channel weights (a 1x1 conv). Inputs are [N, 3, H, W]
    in [-1, 1]; returns [N]. Identical images give exactly 0.
    """

    def __init__(self, net: str = "alex"):
        super().__init__()
        if net not in NETS:
            raise ValueError(f"LPIPS backbone must be one of {sorted(NETS)}, got {net!r}")
        self.net_name = net
        self.scaling_layer = _ScalingLayer()
        self.net = _Backbone(net)
        for i, channels in enumerate(NETS[net][2]):
            setattr(self, f"lin{i}", _LinearHead(channels))
        self.eval().requires_grad_(False)

    @staticmethod
    def _normalize(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
        return f / (torch.sqrt((f**2).sum(dim=1, keepdim=True)) + eps)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"LPIPS needs two [N, 3, H, W] tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
        fx, fy = self.net(self.scaling_layer(x)), self.net(self.scaling_layer(y))
        total = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
        for i, (a, b) in enumerate(zip(fx, fy)):
            diff = (self._normalize(a) - self._normalize(b)) ** 2
            total = total + getattr(self, f"lin{i}")(diff).mean(dim=(1, 2, 3))
        return total


def _infer_net(state: dict[str, torch.Tensor], path: Path) -> str:
    convs = [k for k in state if k.startswith("net.slice") and k.endswith(".weight")]
    for net, (layers, _, _) in NETS.items():
        if len(convs) == sum(1 for spec in layers if spec[0] == "conv"):
            return net
    raise LPIPSWeightsError(f"LPIPS weights {path}: {len(convs)} backbone conv weights match neither AlexNet (5) nor VGG16 (13)")


def load_lpips(path: str | os.PathLike, device: str = "cpu") -> LPIPS:
    """Load an LPIPS network from a safetensors file holding backbone + linear heads (+ scaling buffers).

    The backbone type comes from the file's metadata `net` ("alex" | "vgg") or, without it, from
    the number of conv layers. Raises FileNotFoundError for a missing file and LPIPSWeightsError
    naming the file and the missing / unexpected / mis-shaped keys otherwise.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LPIPS weights {path}: file not found (build one with metrics.lpips.convert_lpips_weights)")
    if path.suffix != ".safetensors":
        raise LPIPSWeightsError(f"LPIPS weights {path}: expected a .safetensors file")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise LPIPSWeightsError(f"LPIPS weights {path}: not a readable safetensors file ({err})") from err
    net = metadata.get("net") or _infer_net(state, path)
    model = LPIPS(net)
    expected = model.state_dict()
    # The scaling layer is a fixed constant: files holding only backbone + heads are accepted.
    missing = [k for k in expected if k not in state and not k.startswith("scaling_layer.")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise LPIPSWeightsError(
            f"LPIPS weights {path} ({net}): missing keys {missing[:6]}{'...' if len(missing) > 6 else ''}, "
            f"unexpected keys {unexpected[:6]}{'...' if len(unexpected) > 6 else ''}"
        )
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise LPIPSWeightsError(f"LPIPS weights {path}: '{key}' has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}")
    model.load_state_dict({**expected, **state})
    return model.to(device)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path}: not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise LPIPSWeightsError(f"weights file {path}: expected a state dict")
    return state


def convert_lpips_weights(backbone: str | os.PathLike, heads: str | os.PathLike, out: str | os.PathLike, net: str = "alex") -> Path:
    """Write one LPIPS safetensors file from torchvision's backbone checkpoint and lpips' linear heads.

    `backbone`: torchvision's `alexnet-owt-7be5be79.pth` / `vgg16-397923af.pth` (keys `features.<i>.*`;
    classifier keys are dropped). `heads`: the lpips repo's `lpips/weights/v0.1/<net>.pth`
    (keys `lin<l>.model.1.weight`). Both are read with `torch.load(weights_only=True)`.
    """
    from safetensors.torch import save_file

    if net not in NETS:
        raise ValueError(f"LPIPS backbone must be one of {sorted(NETS)}, got {net!r}")
    backbone_state = _read_state_dict(Path(backbone))
    head_state = _read_state_dict(Path(heads))
    _, slices, _ = NETS[net]
    slice_of = {i: s for s, (lo, hi) in enumerate(slices, start=1) for i in range(lo, hi)}
    state: dict[str, torch.Tensor] = {}
    for key, value in backbone_state.items():
        parts = key.split(".")
        if parts[0] != "features":
            continue
        index = int(parts[1])
        if index in slice_of:
            state[f"net.slice{slice_of[index]}.{index}.{parts[2]}"] = value
    for key, value in head_state.items():
        if key.startswith("lin"):
            state[key] = value
    scaling = _ScalingLayer()
    state["scaling_layer.shift"], state["scaling_layer.scale"] = scaling.shift, scaling.scale
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.safetensors")
    try:
        save_file({k: v.contiguous().float() for k, v in state.items()}, str(tmp), metadata={"net": net, "version": "0.1"})
        load_lpips(tmp)  # fail now, naming the keys, if the inputs were not what they claimed to be
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
