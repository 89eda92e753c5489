"""Models and steps shared by the benchmarks (not tests).

The workload of issue 3 / srnc-notes 4: the training package's ``vresnet-feat``
(``training.models.build_model``: input conv, 5 residual blocks of two convs, output conv, 12
convolutions of PyTorch's default init; the features of the last block are fed back), batch B,
T unrolled frames, square crops. Variants of its convolutions:

* ``plain``: ``nn.Conv2d``;
* ``torch_sn``: ``torch.nn.utils.parametrizations.spectral_norm`` (reshaped kernel);
* ``per_call``: a straightforward SRN-C parametrization (``torch.nn.utils.parametrize``)
  that runs the power iteration and the reweighting on every access of the weight, i.e. once
  per frame of the unroll, per-layer, with ``srnc_ext.reference``;
* ``srnc-<backend>``: ``SRNCConv2d`` (batched once-per-step refresh) with that backend, at the
  paper's soft setting alpha = 2, beta = 0.1 (projected variant: two power iterations);
  ``srnc-<backend>-beta1``: the hard setting alpha = 1, beta = 1 (one power iteration);
  ``srnc-<backend>-nocache``: alpha = 2, beta = 0.1 with the effective weight recomputed on every
  forward (T times per step) instead of reused while provably unchanged: what the cache saves;
  a further ``-every<k>`` (``srnc-cpu-every4``, ``srnc-cpu-beta1-every2``): ``refresh_every=k``, the
  amortized refresh.

``depth`` (residual blocks, default the model's 5) makes the BasicVSR-like trunk of issue 13: 30
blocks of two 64-channel convs.
"""
from __future__ import annotations

import time

import torch
from torch import nn
from torch.nn.utils import parametrize

import srnc_ext
from srnc_ext import reference
from srnc_ext.conv_operator import ConvGeometry
from training.models import build_model

ALPHA, BETA = 2.0, 0.1  # the paper's soft Lipschitz setting


class PerCallSRNC(nn.Module):
    """The straightforward parametrization: full SRN-C on every weight access (reference)."""

    def __init__(self, conv: nn.Conv2d, size: int) -> None:
        super().__init__()
        self.geometry = ConvGeometry.from_conv(conv, size)
        self.register_buffer("u", torch.randn(self.geometry.output_shape()))
        self.register_buffer("v", torch.randn(self.geometry.input_shape()))
        self.register_buffer("u_out", torch.randn(self.geometry.output_shape()))
        self.register_buffer("v_out", torch.randn(self.geometry.input_shape()))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        with torch.no_grad():
            u, v = reference.power_iteration(weight.detach(), self.u, self.v, g, 1, 1e-12)
            self.u.copy_(u), self.v.copy_(v)
            s1 = reference.rank_one_kernel(u, v, g)
            rw = reference.reweighted_kernel(weight.detach(), s1, g, beta=BETA, eps=1e-12, variant="projected")
            u2, v2 = reference.power_iteration(rw, self.u_out, self.v_out, g, 1, 1e-12)
            self.u_out.copy_(u2), self.v_out.copy_(v2)
            s1_out = reference.rank_one_kernel(u2, v2, g)
        return reference.srnc_weight(weight, s1, g, alpha=ALPHA, beta=BETA, eps=1e-12, variant="projected", s1_out=s1_out)


def build(kind: str, width: int, size: int, device="cpu", seed: int = 0, depth=None) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model("vresnet-feat", width=width, depth=depth).to(device)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if kind == "plain":
        pass
    elif kind == "torch_sn":
        for conv in convs:
            nn.utils.parametrizations.spectral_norm(conv)
    elif kind == "per_call":
        for conv in convs:
            parametrize.register_parametrization(conv, "weight", PerCallSRNC(conv, size).to(device))
    elif kind.startswith("srnc-"):
        backend, *options = kind[len("srnc-"):].split("-")
        every = [int(o[len("every"):]) for o in options if o.startswith("every")]
        alpha, beta = (1.0, 1.0) if "beta1" in options else (ALPHA, BETA)
        srnc_ext.convert(model, alpha=alpha, beta=beta, input_size=size, backend=backend,
                         refresh_every=every[0] if every else 1)
        if "nocache" in options:
            for layer in model.modules():
                if isinstance(layer, srnc_ext.SRNCConv2d):
                    layer._cache_weight = False
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return model


def available_srnc_kinds(device: str) -> list:
    kinds = ["srnc-reference"]
    if srnc_ext.backends.compiled_available(torch.device(device).type):
        kinds.insert(0, "srnc-cuda" if device.startswith("cuda") else "srnc-cpu")
    if srnc_ext.backends.triton_available(torch.device(device).type) and device.startswith("cuda"):
        kinds.append("srnc-triton")
    return kinds + [kinds[0] + "-beta1", kinds[0] + "-nocache"]


def make_step(model: nn.Module, batch: int, frames: int, size: int, device="cpu"):
    """A closure running one training step (forward over T frames, backward, Adam step)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    gen = torch.Generator(device=device).manual_seed(0)
    clean = torch.rand(batch, frames, 3, size, size, generator=gen, device=device)
    noisy = clean + 0.1 * torch.randn(clean.shape, generator=gen, device=device)

    def step():
        loss = (model(noisy) - clean).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clean.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        opt.step()  # SRN-C layers refresh here (optimizer step post-hook)
        if clean.is_cuda:
            torch.cuda.synchronize()
        step.optimizer_s = time.perf_counter() - start
        return loss

    return step


def saved_activation_bytes(step) -> int:
    """Bytes of tensors saved for backward during one step (peak autograd memory on any device)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return total
