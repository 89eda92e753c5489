"""SRN-C reference: exactness of the normalization against explicit-matrix spectra,
the paper variant against a line-by-line transcription of Algorithm 2, and gradcheck."""
import math

import pytest
import torch
from oracles import singular_values, stable_rank

from srnc_ext import SRNCConv2d, reference
from srnc_ext.conv_operator import ConvGeometry

CONVERGED = 400  # power iterations: enough for 1e-3 on these random kernels (gap >~ 2 %)


def _converged_layer(beta, alpha=1.0, padding_mode="zeros", stride=1, variant="projected", seed=0):
    torch.manual_seed(seed)
    layer = SRNCConv2d(6, 6, 3, stride=stride, padding=1, padding_mode=padding_mode, alpha=alpha, beta=beta,
                       input_size=10, n_power_iterations=CONVERGED, variant=variant, dtype=torch.float64)
    layer.refresh()
    return layer


@pytest.mark.parametrize("stride", (1, 2))
@pytest.mark.parametrize("padding_mode", ("zeros", "circular"))
@pytest.mark.parametrize("alpha", (0.5, 1.0, 2.0))
@pytest.mark.parametrize("beta", (1.0, 0.4, 0.1, 0.05))
def test_sigma_max_equals_alpha(beta, alpha, padding_mode, stride):
    layer = _converged_layer(beta, alpha, padding_mode, stride)
    sigma = singular_values(layer.geometry, layer.effective_weight())[0].item()
    assert sigma == pytest.approx(alpha, rel=1e-3)


@pytest.mark.parametrize("stride", (1, 2))
@pytest.mark.parametrize("padding_mode", ("zeros", "circular"))
def test_stable_rank_never_increases_as_beta_decreases(padding_mode, stride):
    ranks = []
    for beta in (1.0, 0.4, 0.1, 0.05):
        layer = _converged_layer(beta, 1.0, padding_mode, stride)
        ranks.append(stable_rank(layer.geometry, layer.effective_weight()))
    assert all(b <= a * (1 + 1e-6) for a, b in zip(ranks, ranks[1:])), ranks
    assert ranks[-1] < 0.5 * ranks[0], ranks


@pytest.mark.parametrize("padding_mode", ("zeros", "circular", "reflect"))
def test_projected_variant_reaches_target_stable_rank_when_reachable(padding_mode):
    # beta * full_rank = 60 is well above the floor ||W(S1)||_F^2 for this layer
    layer = _converged_layer(0.1, 1.0, padding_mode)
    target = 0.1 * layer.geometry.full_rank
    assert stable_rank(layer.geometry, layer.effective_weight()) == pytest.approx(target, rel=0.1)


@pytest.mark.parametrize("padding_mode", ("zeros", "circular", "replicate"))
def test_beta_one_is_spectral_normalization_of_true_operator(padding_mode):
    layer = _converged_layer(1.0, 1.5, padding_mode)
    sigma = singular_values(layer.geometry, layer.weight)[0]
    torch.testing.assert_close(layer.effective_weight(), 1.5 * layer.weight / sigma, rtol=1e-3, atol=1e-6)


def _algorithm2_literal(K, u, alpha, beta, n, m, eps, conv, conv_T):
    """Algorithm 2 of the paper, one iteration, transcribed line by line."""
    K_ = K  # 1
    v = conv_T(K_, u)
    v = v / v.norm()  # 2
    u = conv(K_, v)
    u = u / u.norm()  # 3
    K_ = K_ / ((u * conv(K_, v)).sum() + eps)  # 4
    if beta < 1:
        K_var = K_.detach().requires_grad_()
        S1, = torch.autograd.grad((u * conv(K_var, v)).sum(), K_var)  # 5
        S2 = K_ - S1  # 6
        gamma = math.sqrt(beta * m - 1 / n**2) / S2.norm()  # 7
        if gamma < 1:  # 8
            K_ = S1 + gamma * S2
    return alpha * K_, u  # 10 uses alpha * K~


@pytest.mark.parametrize("padding_mode", ("zeros", "circular"))
@pytest.mark.parametrize("beta", (1.0, 0.5, 0.1, 0.02))
def test_paper_variant_matches_transcription_of_algorithm_2(padding_mode, beta):
    n, m, alpha, eps = 8, 4, 1.7, 1e-12
    torch.manual_seed(1)
    layer = SRNCConv2d(m, m, 3, padding=1, padding_mode=padding_mode, alpha=alpha, beta=beta, input_size=n,
                       variant="paper", eps=eps, dtype=torch.float64)
    u0 = layer.u.clone()
    pad_mode = "constant" if padding_mode == "zeros" else padding_mode

    def conv(K, x):
        return torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode=pad_mode), K)

    def conv_T(K, y):  # the transposed convolution, as the vector-Jacobian product of conv
        x = torch.zeros(1, m, n, n, dtype=K.dtype, requires_grad=True)
        return torch.autograd.grad((conv(K, x) * y).sum(), x)[0]

    expected, u_expected = _algorithm2_literal(layer.weight.detach(), u0, alpha, beta, n, m, eps, conv, conv_T)
    layer.refresh()
    torch.testing.assert_close(layer.u, u_expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(layer.effective_weight(), expected, rtol=1e-12, atol=1e-14)
    if beta == 0.02:  # make sure the reweighting branch (gamma < 1) was exercised
        kn = reference.spectral_normalize(layer.weight.detach(), reference.rank_one_kernel(layer.u, layer.v, layer.geometry), eps)
        s2 = kn - reference.rank_one_kernel(layer.u, layer.v, layer.geometry)
        assert reference.paper_gamma(s2, beta, layer.geometry.full_rank, n * n) < 1


def test_generalized_gamma_reduces_to_paper_formula():
    n, m, beta = 16, 8, 0.1
    s2 = torch.randn(m, m, 3, 3, dtype=torch.float64)
    paper = math.sqrt(beta * m - 1 / n**2) / s2.norm()
    torch.testing.assert_close(reference.paper_gamma(s2, beta, m * n * n, n * n), paper)
    # projected gamma with the paper's assumptions ||W(S1)||_F = 1, ||W(S2)||_F = n ||S2||_F (circular)
    rest_energy = torch.tensor(n * n * float(s2.norm()) ** 2, dtype=torch.float64)
    one = torch.tensor(1.0, dtype=torch.float64)
    torch.testing.assert_close(reference.projected_gamma(one, rest_energy, beta, m * n * n), paper)


def test_projected_split_is_orthogonal_in_operator_frobenius():
    geometry = ConvGeometry.create((5, 3, 3, 3), (9, 7), padding=1, padding_mode="reflect")
    k = torch.randn(geometry.weight_shape, dtype=torch.float64)
    u = torch.randn(geometry.output_shape(), dtype=torch.float64)
    v = torch.randn(geometry.input_shape(), dtype=torch.float64)
    u, v = reference.power_iteration(k, u, v, geometry, 50, 1e-12)
    s1 = reference.rank_one_kernel(u, v, geometry)
    kn = reference.spectral_normalize(k, s1, 1e-12)
    gram, pinv = geometry.kernel_gram(), geometry.kernel_gram_pinv()
    top, rest, top_energy, rest_energy = reference.projected_split(kn, s1, gram, pinv)
    from oracles import explicit_matrix

    w_top, w_rest = explicit_matrix(geometry, top), explicit_matrix(geometry, rest)
    assert abs(float((w_top * w_rest).sum())) < 1e-10 * float(w_top.norm() * w_rest.norm())
    torch.testing.assert_close(top_energy, w_top.pow(2).sum())
    torch.testing.assert_close(rest_energy, w_rest.pow(2).sum())


@pytest.mark.parametrize("variant", ("projected", "paper"))
@pytest.mark.parametrize("beta", (1.0, 0.3, 0.02))
@pytest.mark.parametrize("padding_mode", ("zeros", "reflect"))
def test_gradcheck_reweighting(variant, beta, padding_mode):
    geometry = ConvGeometry.create((3, 2, 3, 3), 6, padding=1, padding_mode=padding_mode)
    gen = torch.Generator().manual_seed(3)
    kernel = torch.randn(geometry.weight_shape, dtype=torch.float64, generator=gen, requires_grad=True)
    u = torch.randn(geometry.output_shape(), dtype=torch.float64, generator=gen)
    v = torch.randn(geometry.input_shape(), dtype=torch.float64, generator=gen)
    u, v = reference.power_iteration(kernel.detach(), u, v, geometry, 30, 1e-12)
    s1 = reference.rank_one_kernel(u, v, geometry)
    s1_out = reference.rank_one_kernel(u.flip(-1), v.flip(-2), geometry)  # any fixed kernel will do

    def f(k):
        return reference.srnc_weight(k, s1, geometry, alpha=1.3, beta=beta, eps=1e-12, variant=variant, s1_out=s1_out)

    assert torch.autograd.gradcheck(f, (kernel,))
    if beta == 0.02:  # gamma < 1 is the branch under test
        kn = reference.spectral_normalize(kernel.detach(), s1, 1e-12)
        if variant == "paper":
            gamma = reference.paper_gamma(kn - s1, beta, geometry.full_rank, 36)
        else:
            _, _, te, re = reference.projected_split(kn, s1, geometry.kernel_gram(), geometry.kernel_gram_pinv())
            gamma = reference.projected_gamma(te, re, beta, geometry.full_rank)
        assert gamma < 1
