"""EDSD: the surrogate's parameter gradient equals the gradient with the UNet's input-Jacobian replaced by J*I."""
from __future__ import annotations

import pytest
import torch

from dreamsteer.distill.edsd import check_jacobian, edsd_loss, edsd_surrogate, noised

JACOBIANS = (-1.0, 0.0, 1.0)


def _true_loss(predict, target, z_src, eps, alpha, mask, eta):
    """||M (eps_phi(x_hat_t(phi)) - target)||^2 / N by plain autograd, no stop-gradient anywhere."""
    x_t_src = noised(z_src, eps, alpha)
    z_hat = z_src - eta * mask * (predict(x_t_src) - target)
    x_hat = noised(z_hat, eps, alpha)
    r = mask * (predict(x_hat) - target)
    return r.pow(2).sum() / r.numel()


class StandIn(torch.nn.Module):
    """eps_phi(x) = J * x + g_phi(c): its input-Jacobian is exactly J * I, so autograd of the true loss
    is the Jacobian-replaced gradient."""

    def __init__(self, jacobian: float, shape: tuple[int, ...]):
        super().__init__()
        self.jacobian, self.shape = jacobian, shape
        numel = int(torch.tensor(shape).prod())
        self.c = torch.randn(1, 6, dtype=torch.float64)
        self.g = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, numel)).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.jacobian * x + self.g(self.c).reshape(self.shape)


@pytest.mark.parametrize("jacobian", JACOBIANS)
@pytest.mark.parametrize("soft_mask", [False, True])
def test_surrogate_gradient_equals_true_gradient_of_stand_in(jacobian, soft_mask):
    torch.manual_seed(0)
    shape = (1, 4, 8, 8)
    net = StandIn(jacobian, shape)
    z_src, eps, target = (torch.randn(shape, dtype=torch.float64) for _ in range(3))
    alpha = torch.tensor(0.6, dtype=torch.float64)
    mask = torch.rand(shape[0], 1, *shape[2:], dtype=torch.float64)
    mask = mask if soft_mask else (mask > 0.4).double()
    eta = 0.3
    params = list(net.parameters())

    out = edsd_loss(net(noised(z_src, eps, alpha)), net, target, z_src, eps, alpha, mask, eta, jacobian)
    surrogate = torch.autograd.grad(out.loss, params, retain_graph=True)
    true = torch.autograd.grad(_true_loss(net, target, z_src, eps, alpha, mask, eta), params)
    for a, b in zip(surrogate, true):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # the value of the true loss is reported alongside
    torch.testing.assert_close(out.residual_norm, _true_loss(net, target, z_src, eps, alpha, mask, eta).detach())

    if jacobian != 0.0:  # the correction term matters: dropping it gives a different gradient
        naive = torch.autograd.grad(out.residual.pow(2).sum() / out.residual.numel(), params)
        assert max((a - b).abs().max().item() for a, b in zip(naive, true)) > 1e-6


def _unet_predict(unet, t, emb, null_emb, scale):
    def predict(x):
        out = unet(torch.cat([x, x]), t.expand(2), encoder_hidden_states=torch.cat([null_emb, emb])).sample
        uncond, cond = out.chunk(2)
        return uncond + scale * (cond - uncond)

    return predict


@pytest.mark.parametrize("jacobian", JACOBIANS)
def test_surrogate_gradient_on_tiny_unet_equals_chain_rule_with_jacobian_replaced(fresh_backbone, jacobian):
    """On the real tiny UNet (with CFG): the surrogate gradient equals autograd of the true loss through
    a network whose value is the UNet's and whose input-Jacobian is J*I: J*(x - sg(x)) + unet(sg(x))."""
    bb = fresh_backbone
    unet = bb.unet.double()
    # a hand-made "adapter": the decoder's cross-attention k/v of the last up block, as Custom Diffusion trains
    params = [p for n, p in unet.named_parameters() if n.startswith("up_blocks.3") and ("attn2.to_k" in n or "attn2.to_v" in n)]
    assert params
    for p in params:
        p.requires_grad_(True)
    gen = torch.Generator().manual_seed(1)
    z_src = torch.randn(1, 4, 16, 16, generator=gen, dtype=torch.float64)
    eps = torch.randn(1, 4, 16, 16, generator=gen, dtype=torch.float64)
    t = torch.tensor([400])
    alpha = bb.alphas_cumprod[t].double()
    with torch.no_grad():
        emb, null = bb.encode_prompt(["a photo of a sks cat", ""]).double().chunk(2)
        target = torch.randn(1, 4, 16, 16, generator=gen, dtype=torch.float64)
    mask = (torch.rand(1, 1, 16, 16, generator=gen) > 0.5).double()
    predict = _unet_predict(unet, t, emb, null, scale=3.0)
    eta = 0.5

    out = edsd_loss(predict(noised(z_src, eps, alpha)), predict, target, z_src, eps, alpha, mask, eta, jacobian)
    surrogate = torch.autograd.grad(out.loss, params)

    def replaced(x):
        return jacobian * (x - x.detach()) + predict(x.detach())

    # d = eps_phi(x_t_src) - target: the input x_t_src does not depend on phi, so plain predict there
    x_t_src = noised(z_src, eps, alpha)
    d = predict(x_t_src) - target
    x_hat = noised(z_src - eta * mask * d, eps, alpha)
    r = mask * (replaced(x_hat) - target)
    true = torch.autograd.grad(r.pow(2).sum() / r.numel(), params)
    for a, b in zip(surrogate, true):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
    assert any(g.abs().max() > 0 for g in surrogate)


def test_bad_jacobian_and_reduction_are_rejected():
    with pytest.raises(ValueError, match="jacobian"):
        check_jacobian(2)
    with pytest.raises(ValueError, match="reduction"):
        edsd_surrogate(torch.zeros(2), torch.zeros(2), None, -1, reduction="max")


def test_sum_reduction_scales_mean():
    torch.manual_seed(0)
    r, x = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    torch.testing.assert_close(edsd_surrogate(r, x, None, -1, "sum"), edsd_surrogate(r, x, None, -1, "mean") * r.numel())
