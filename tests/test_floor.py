"""The floor tau on SRN-C's sigma estimate (the ops' last argument ``floor``; issue 12, item 3).

Without it, SRN-C's gradient at an all-zero kernel is about ``alpha / eps`` or more (max |dL/dK| /
max |g| measured here: 1.7e12 for SN, 7.4e11 for paper, 1.7e24 for projected), so a zero-initialized
layer cannot train. With
``tau > 0`` and ``lambda = min(1, max(s, 0) / tau)^2`` every backend computes
``out = lambda R(K) + (1 - lambda) (alpha / tau) K`` (``srnc_ext.ops.coefficients``). Checked here,
for the reference (``srnc_ext.reference`` and the pure-PyTorch ops) and every fast backend:

- ``floor = 0`` is the ops without the floor, bit for bit;
- at ``K = 0`` and ``K = 10^-k K0`` (k = 1..30), float32 and float64, every variant: forward and
  backward finite, ``||dL/dK_l|| <= C (alpha / tau) ||g_l||`` per layer with ``C = GRAD_BOUND``
  (measured at most 1.249: ``A' = (alpha / tau)(1 + x - x^2) <= 1.25 alpha / tau`` for SN); ``K = 0``
  gives ``out = 0`` and ``dL/dK = (alpha / tau) g``;
- continuity at ``s = tau`` (and C^1 for SN); ``sigma_1(out) <= alpha`` with exact singular vectors;
- the hand-written VJP against autograd, the reference's floored weight by ``gradcheck``, and the
  ops' backward against the reference's autograd.
"""
import importlib
import math

import pytest
import torch
from op_harness import (ALPHA, BACKENDS, EPS, F64, TRITON, OpBackend, OpCase, below_floor, dtype_id, floored, op_case,
                        run_op)
from oracles import explicit_matrix

from srnc_ext import backends, reference
from srnc_ext.ops import Variant, coefficients, coefficients_vjp, naive

coefficients_module = importlib.import_module("srnc_ext.ops.coefficients")  # the package exports the function

VARIANTS = ("sn", "paper", "projected")
REFERENCE = OpBackend("reference", "", "cpu", lambda: backends.REFERENCE)
ALL_BACKENDS = [pytest.param(REFERENCE, id="reference")] + BACKENDS
# C in ||dL/dK_l|| <= C (alpha / tau) ||g_l|| near K = 0 (measured: 1.249 SN, 1.10 paper, 1.04 projected)
GRAD_BOUND = 1.5


def _case(variant, L=3, shape="3x3"):
    """A stack whose reweighting acts (gamma < 1) in the paper and projected variants."""
    return op_case(L, shape, variant, {"sn": None, "paper": 0.3, "projected": 0.1}[variant])


def _with_kernel(case: OpCase, kernel: torch.Tensor, **scalars) -> OpCase:
    return OpCase(case.geometry, {**case.tensors, "kernel": kernel}, {**case.scalars, **scalars}, case.grad)


def _forward_backward(backend, case: OpCase, dtype=F64):
    """(out, stats, dL/dK) of ``backend`` on ``case`` in ``dtype``, the gradient by the op's own backward."""
    tensors, grad = case.cast(dtype, backend.device), case.grad.to(backend.device, dtype)
    out, stats = backend.ops.reweight_forward(**tensors, **case.scalars)
    return out, stats, backend.ops.reweight_backward(grad, **tensors, stats=stats, **case.scalars)


# ---------------------------------------------------------------------------------------------- floor = 0
def _unfloored_naive(tensors, scalars, grad):
    """The pure-PyTorch ops as they were before the floor: ``_unfloored_coefficients`` and its VJP."""
    t = tensors
    s, q, p = naive._reductions(t["kernel"], t["s1"], t["s1_out"], t["gram"], scalars["variant"])
    c0, c1 = t["consts"].unbind(1)
    sc = [scalars[k] for k in ("alpha", "beta_rank", "positions", "eps", "variant")]
    a, b = coefficients_module._unfloored_coefficients(s, q, p, c0, c1, *sc)
    out = a[:, None, None] * t["kernel"] + b[:, None, None] * t["direction"]
    g_a, g_b = (grad * t["kernel"]).sum((1, 2)), (grad * t["direction"]).sum((1, 2))
    g_s, g_q, g_p = coefficients_module._unfloored_coefficients_vjp(s, q, p, c0, c1, g_a, g_b, *sc)
    gk = t["kernel"] @ t["gram"] if scalars["variant"] == Variant.PROJECTED else t["kernel"]
    grad_k = a[:, None, None] * grad + g_s[:, None, None] * t["s1"] + (2.0 * g_q)[:, None, None] * gk
    if scalars["variant"] == Variant.PROJECTED:
        grad_k = grad_k + g_p[:, None, None] * t["s1_out"]
    return out, torch.stack([s, q, p], 1), grad_k


@pytest.mark.parametrize("dtype", (F64, torch.float32), ids=dtype_id)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_floor_zero_is_the_op_without_floor_bit_for_bit(backend, variant, dtype):
    c = _case(variant)
    tensors, grad = c.cast(dtype, backend.device), c.grad.to(backend.device, dtype)
    without = _forward_backward(backend, c, dtype)  # the scalars of op_case carry no floor
    explicit = _forward_backward(backend, c.with_scalars(floor=0.0), dtype)
    for a, b in zip(without, explicit):
        assert torch.equal(a, b)
    if backend is REFERENCE:
        for a, b in zip(without, _unfloored_naive(tensors, c.scalars, grad)):
            assert torch.equal(a, b)
    else:  # the torch.ops schema: called positionally without floor, as every call site did before it
        op = backend.torch_op
        scalars = list(c.scalars.values())
        out, stats = op("reweight_forward")(*tensors.values(), *scalars)
        assert torch.equal(out, without[0]) and torch.equal(stats, without[1])
        assert torch.equal(op("reweight_backward")(grad, *tensors.values(), stats, *scalars), without[2])


def test_floor_zero_coefficients_are_the_unfloored_ones():
    c = _case("projected")
    stats = naive.reweight_forward(**c.tensors, **c.scalars)[1]
    sc = [c.scalars[k] for k in ("alpha", "beta_rank", "positions", "eps", "variant")]
    args = (*stats.unbind(1), *c.tensors["consts"].unbind(1))
    g = (torch.randn(3, dtype=F64), torch.randn(3, dtype=F64))
    for got, old in zip(coefficients(*args, *sc, 0.0), coefficients_module._unfloored_coefficients(*args, *sc)):
        assert torch.equal(got, old)
    for got, old in zip(coefficients_vjp(*args, *g, *sc, 0.0),
                        coefficients_module._unfloored_coefficients_vjp(*args, *g, *sc)):
        assert torch.equal(got, old)


# ---------------------------------------------------------------------------------------------- near K = 0
NEAR_ZERO_SCALES = [0.0] + [10.0**-k for k in range(1, 31)]


# Triton through its interpreter (~3 s a case here): tau = alpha only
NEAR_ZERO_CASES = [pytest.param(p.values[0], variant, dtype, tau, marks=p.marks,
                                id=f"{p.id}-{variant}-{dtype_id(dtype)}-tau{tau}")
                   for p in ALL_BACKENDS for variant in VARIANTS for dtype in (F64, torch.float32)
                   for tau in (ALPHA, 0.25) if tau == ALPHA or not (p.values[0] is TRITON and TRITON.device == "cpu")]


@pytest.mark.parametrize("backend,variant,dtype,tau", NEAR_ZERO_CASES)
def test_gradient_bounded_at_and_near_zero_kernel(backend, variant, dtype, tau):
    c = _case(variant)
    worst = 0.0
    for scale in NEAR_ZERO_SCALES:
        case = _with_kernel(c, c.tensors["kernel"] * scale, floor=tau)
        out, stats, grad_k = _forward_backward(backend, case, dtype)
        assert torch.isfinite(out).all() and torch.isfinite(stats).all() and torch.isfinite(grad_k).all(), scale
        g = case.grad.to(dtype)
        s = stats[:, 0].cpu()
        ratio = grad_k.cpu().to(F64).norm(dim=(1, 2)) / (ALPHA / tau * g.to(F64).norm(dim=(1, 2)))
        below = s < tau  # above the floor the layer is unchanged (s ~ 11 at scale 1: only 0.1 with tau = 0.25)
        assert (ratio[below] <= GRAD_BOUND).all(), (scale, ratio)
        worst = max(worst, ratio[below].max().item() if below.any() else 0.0)
        if scale == 0.0:
            assert torch.equal(out.cpu(), torch.zeros_like(out.cpu()))
            torch.testing.assert_close(grad_k.cpu(), (ALPHA / tau) * g)
        elif s.max() < 1e-3 * tau:  # deep below the floor: out ~ (alpha / tau) K
            linear = (ALPHA / tau) * case.tensors["kernel"].to(dtype)
            assert ((out.cpu() - linear).norm(dim=(1, 2)) <= 3e-3 * linear.norm(dim=(1, 2))).all()
    assert worst > 1.0  # the bound is not vacuous: A' reaches (alpha / tau)(1 + x - x^2) > alpha / tau


def test_without_the_floor_the_gradient_at_zero_is_huge():
    """What the floor fixes: at K = 0 the unfloored gradient is ~ alpha / eps |g| (and more)."""
    for variant in VARIANTS:
        c = _case(variant)
        zero = _with_kernel(c, torch.zeros_like(c.tensors["kernel"]))
        grad_k = _forward_backward(REFERENCE, zero)[2]
        assert grad_k.abs().max() > 1e11 * c.grad.abs().max(), variant


# ---------------------------------------------------------------------------------------------- continuity
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_continuous_at_the_floor(backend, variant):
    """K_+- = K0 tau / s0 (1 +- delta): s = tau (1 +- delta); the outputs differ by O(delta) |out|."""
    c = _case(variant)
    tau = ALPHA
    s0 = naive.reweight_forward(**c.tensors, **c.scalars)[1][:, 0]
    on_floor = c.tensors["kernel"] * (tau / s0)[:, None, None]
    for delta in (1e-4, 1e-7):
        outs = [_forward_backward(backend, _with_kernel(c, on_floor * (1.0 + sign * delta), floor=tau))[:2]
                for sign in (-1.0, 1.0)]
        assert (outs[0][1][:, 0] < tau).all() and (outs[1][1][:, 0] > tau).all()
        diff = (outs[1][0] - outs[0][0]).norm(dim=(1, 2)) / outs[1][0].norm(dim=(1, 2))
        assert (diff <= 20 * delta).all(), (delta, diff)


def test_sn_coefficient_is_continuously_differentiable_at_the_floor():
    """SN: A' has the same one-sided derivatives at s = tau (-alpha / tau^2); paper/projected are
    continuous there only (the blend's lambda' (R - (alpha / tau) K) does not vanish)."""
    tau, h = 2.0, 1e-6
    zero = torch.zeros(3, dtype=F64)
    s = torch.tensor([tau * (1 - h), tau, tau * (1 + h)], dtype=F64)
    a, _ = coefficients(s, zero, zero, zero + 1, zero, ALPHA, 1.0, 1.0, EPS, Variant.SN, tau)
    left, right = (a[1] - a[0]) / (tau * h), (a[2] - a[1]) / (tau * h)
    assert math.isclose(left.item(), right.item(), rel_tol=1e-5)
    assert math.isclose(left.item(), -ALPHA / tau**2, rel_tol=1e-5)
    # and the hand-written VJP gives that derivative on both sides
    g_s = coefficients_vjp(s, zero, zero, zero + 1, zero, torch.ones(3, dtype=F64), zero, ALPHA, 1.0, 1.0, EPS,
                           Variant.SN, tau)[0]
    torch.testing.assert_close(g_s, torch.full_like(g_s, -ALPHA / tau**2), rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------------- sigma_1 <= alpha
def _exact_inputs(variant, beta):
    """One layer of ``_case(variant)`` with its power-iteration kernels from the exact top singular
    vectors (dense SVD of the explicit operator matrix), so that ``s = sigma_1(K)`` to rounding."""
    c = _case(variant, L=1)
    geometry = c.geometry
    kernel = c.tensors["kernel"].reshape(geometry.weight_shape)

    def top_pair(k):
        u, _, vh = torch.linalg.svd(explicit_matrix(geometry, k))
        return u[:, 0].reshape(geometry.output_shape()), vh[0].reshape(geometry.input_shape())

    s1 = reference.rank_one_kernel(*top_pair(kernel), geometry)
    rw = reference.reweighted_kernel(kernel, s1, geometry, beta=beta, eps=EPS, variant=variant if variant != "sn"
                                     else "paper")
    s1_out = reference.rank_one_kernel(*top_pair(rw), geometry)
    T = kernel.shape[-1] * kernel.shape[-2]
    flat = lambda x: x.reshape(1, -1, T)  # noqa: E731
    code = Variant[variant.upper()]
    direction, consts = naive.prepare_constants(flat(s1), flat(s1_out), geometry.kernel_gram_pinv(), code)
    tensors = dict(kernel=flat(kernel), s1=flat(s1), direction=direction, s1_out=flat(s1_out),
                   gram=geometry.kernel_gram(), consts=consts)
    h, w = geometry.output_size
    scalars = dict(alpha=ALPHA, beta_rank=beta * geometry.full_rank, positions=float(h * w), eps=EPS, variant=int(code))
    return OpCase(geometry, tensors, scalars, c.grad), torch.linalg.svdvals(explicit_matrix(geometry, kernel))[0]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_sigma_1_at_most_alpha_below_the_floor(backend, variant):
    """``sigma_1(out) <= lambda sigma_1(R) + (1 - lambda) alpha s / tau`` (triangle inequality), which is
    ``<= alpha`` where ``sigma_1(R) = alpha`` (SN, projected; the paper variant's reweighting does not
    keep sigma_1 at alpha, so there only the triangle bound is checked)."""
    c, sigma = _exact_inputs(variant, {"sn": 1.0, "paper": 0.3, "projected": 0.1}[variant])
    weight = lambda out: out.reshape(c.geometry.weight_shape).cpu()  # noqa: E731
    sigma_of = lambda out: torch.linalg.svdvals(explicit_matrix(c.geometry, weight(out)))[0].item()  # noqa: E731
    out0, stats, _ = _forward_backward(backend, c)
    s = stats[0, 0].item()
    assert math.isclose(s, sigma.item(), rel_tol=1e-12)
    sigma_r = sigma_of(out0)
    if variant != "paper":
        assert math.isclose(sigma_r, ALPHA, rel_tol=1e-9), sigma_r
    for x in (0.01, 0.3, 0.6, 0.9, 0.999):
        tau = s / x
        got = sigma_of(_forward_backward(backend, c.with_scalars(floor=tau))[0])
        bound = x * x * sigma_r + (1 - x * x) * ALPHA * x
        assert got <= bound * (1 + 1e-6), (x, got, bound)
        if variant != "paper":
            assert got <= ALPHA * (1 + 1e-6), (x, got)


# ---------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("variant", VARIANTS)
def test_floored_vjp_matches_autograd(variant):
    """The hand-written VJP of the floored coefficients against autograd, s from below 0 to above tau."""
    code, tau = Variant[variant.upper()], 1.0
    gen = torch.Generator().manual_seed(int(code))
    L = 64
    s = torch.linspace(-0.5, 2.0, L, dtype=F64)
    s = torch.where((s - tau).abs() < 1e-3, s + 0.01, s)
    s[5] = 0.0
    s.requires_grad_()
    q = (20 + 50 * torch.rand(L, dtype=F64, generator=gen)).requires_grad_()
    p = (0.5 + torch.rand(L, dtype=F64, generator=gen)).requires_grad_()
    c0 = 0.5 + torch.rand(L, dtype=F64, generator=gen)
    c1 = torch.rand(L, dtype=F64, generator=gen)
    args = (1.3, 30.0, 49.0, 1e-12, code, tau)
    a, b = coefficients(s, q, p, c0, c1, *args)
    g_a, g_b = torch.randn(L, dtype=F64, generator=gen), torch.randn(L, dtype=F64, generator=gen)
    expected = torch.autograd.grad((a * g_a + b * g_b).sum(), (s, q, p), allow_unused=True, materialize_grads=True)
    got = coefficients_vjp(s.detach(), q.detach(), p.detach(), c0, c1, g_a, g_b, *args)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    assert all(torch.isfinite(g).all() for g in got)


def _reference_weights(case: OpCase, kernels: torch.Tensor, variant: str, beta: float) -> torch.Tensor:
    geometry, sc = case.geometry, case.scalars
    L = kernels.shape[0]
    s1, s1_out = (case.tensors[k].reshape(L, *geometry.weight_shape) for k in ("s1", "s1_out"))
    return torch.stack([reference.srnc_weight(kernels[i], s1[i], geometry, alpha=sc["alpha"], beta=beta,
                                              eps=sc["eps"], variant=variant, s1_out=s1_out[i],
                                              floor=sc.get("floor", 0.0)) for i in range(L)])


REFERENCE_CASES = [("paper", 1.0), ("projected", 0.3), ("paper", 0.3)]


@pytest.mark.parametrize("variant,beta", REFERENCE_CASES, ids=[f"{v}-b{b}" for v, b in REFERENCE_CASES])
def test_reference_floored_weight_gradcheck(variant, beta):
    """gradcheck (float64) of ``reference.srnc_weight(..., floor=tau)`` with s < tau (lambda = 1/4)."""
    c = op_case(1, "3x2", "sn" if beta >= 1.0 else variant, None if beta >= 1.0 else beta)
    kernel = c.tensors["kernel"].reshape(1, *c.geometry.weight_shape).clone()
    s = naive.reweight_forward(**c.tensors, **c.scalars)[1][0, 0].item()
    case = c.with_scalars(floor=2.0 * s)
    fn = lambda k: _reference_weights(case, k, variant, beta)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (kernel.requires_grad_(),), eps=1e-6, atol=1e-7, rtol=1e-5)


MIXED = [(v, b, kind) for v, b in REFERENCE_CASES for kind in ("straddle", "mixed")]


@pytest.mark.parametrize("variant,beta,kind", MIXED, ids=[f"{v}-b{b}-{k}" for v, b, k in MIXED])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_ops_match_the_reference_autograd(backend, variant, beta, kind):
    """The floored ops' forward and backward against the per-layer reference's autograd. ``straddle``:
    the floor between the layers' sigma estimates; ``mixed``: one layer above the floor, one deep
    below it (K scaled by 1e-3), one with s < 0 (K negated: lambda = 0, out = (alpha / tau) K)."""
    c = op_case(3, "3x2", "sn" if beta >= 1.0 else variant, None if beta >= 1.0 else beta)
    if kind == "straddle":
        c = floored(c)
        assert set(below_floor(c).tolist()) == {True, False}
    else:
        s = naive.reweight_forward(**c.tensors, **c.scalars)[1][:, 0]
        kernel = c.tensors["kernel"] * torch.tensor([1.0, 1e-3, -1.0], dtype=F64)[:, None, None]
        c = _with_kernel(c, kernel, floor=0.5 * s.min().item())
    layers = lambda x: x.reshape(3, *c.geometry.weight_shape)  # noqa: E731
    k = layers(c.tensors["kernel"]).clone().requires_grad_()
    expected = _reference_weights(c, k, variant, beta)
    (expected * layers(c.grad)).sum().backward()
    if backend is REFERENCE:  # its ops are differentiable PyTorch: the closed-form backward, called
        out, stats, grad_k = _forward_backward(backend, c)
    else:  # through the op's autograd
        out, stats, grad_k = run_op(backend.ops, c.cast(F64, backend.device), c.scalars, c.grad.to(backend.device))
    torch.testing.assert_close(out.cpu().view_as(expected), expected.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_k.cpu().view_as(k), k.grad, rtol=1e-8, atol=1e-10)
    if kind == "mixed":
        tau = c.scalars["floor"]
        torch.testing.assert_close(out[2].cpu(), (ALPHA / tau) * c.tensors["kernel"][2], rtol=1e-14, atol=0)
        torch.testing.assert_close(grad_k[2].cpu(), (ALPHA / tau) * c.grad[2], rtol=1e-14, atol=0)


def test_reference_rejects_a_bad_floor():
    c = _case("sn", L=1)
    kernel = c.tensors["kernel"].reshape(c.geometry.weight_shape)
    s1 = c.tensors["s1"].reshape(c.geometry.weight_shape)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="floor"):
            reference.srnc_weight(kernel, s1, c.geometry, alpha=ALPHA, beta=1.0, eps=EPS, variant="paper", floor=bad)


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_initialized_kernel_trains_with_adam(variant):
    """A zero kernel under Adam (float32), the layer's vectors held fixed: with tau = alpha the effective
    weight stays ~ the raw weight while its sigma is below alpha, so the floored layer follows the plain
    one; without the floor the first step's gradient (~ alpha / eps) breaks Adam's state."""
    c = _case(variant, L=1)
    tensors = c.cast(torch.float32)
    target = 0.05 * torch.randn(tensors["kernel"].shape, generator=torch.Generator().manual_seed(3))

    constants = [tensors[k] for k in ("s1", "direction", "s1_out", "gram", "consts")]

    class Weight(torch.autograd.Function):  # the ops' closed-form backward, as the layers use it
        @staticmethod
        def forward(ctx, kernel, floor):
            out, ctx.stats = backends.REFERENCE.reweight_forward(kernel, *constants, *c.scalars.values(), floor)
            ctx.save_for_backward(kernel)
            ctx.floor = floor
            return out

        @staticmethod
        def backward(ctx, grad):
            (kernel,) = ctx.saved_tensors
            return backends.REFERENCE.reweight_backward(grad, kernel, *constants, ctx.stats, *c.scalars.values(),
                                                        ctx.floor), None

    def train(floor, raw):
        kernel = torch.zeros_like(tensors["kernel"], requires_grad=True)
        opt = torch.optim.Adam([kernel], lr=1e-3)
        for _ in range(20):
            out = kernel if raw else Weight.apply(kernel, floor)
            loss = 0.5 * ((out - target) ** 2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return kernel.detach(), opt.state[kernel]["exp_avg_sq"], loss.item()

    plain, _, plain_loss = train(0.0, raw=True)
    kernel, exp_avg_sq, loss = train(ALPHA, raw=False)
    assert torch.isfinite(kernel).all() and torch.isfinite(exp_avg_sq).all()
    assert loss < 0.9 * 0.5 * (target**2).sum().item()  # it trains
    assert math.isclose(loss, plain_loss, rel_tol=0.05), (loss, plain_loss)
    # Adam amplifies the small differences of A' = (alpha / tau)(1 + x - x^2) from alpha / tau
    assert (kernel - plain).norm() <= 0.25 * plain.norm()
    unfloored, unfloored_sq, unfloored_loss = train(0.0, raw=False)
    # without the floor (measured: loss 52 / 6.2 / 0.58 for SN / paper / projected against the plain 0.072;
    # exp_avg_sq up to 4e19, inf for projected): the effective weight jumps to sigma_1 = alpha at once
    assert unfloored_loss > 5 * plain_loss or not torch.isfinite(unfloored_sq).all(), unfloored_loss
