"""Independent ground truth for the tests: explicit operator matrices and their SVD."""
import torch


def explicit_matrix(geometry, kernel: torch.Tensor) -> torch.Tensor:
    """The ``(dim_out, dim_in)`` matrix of ``geometry``'s operator with ``kernel``, in float64,
    built by applying the layer's own convolution (``F.pad`` + ``F.conv2d``) to the identity basis."""
    import torch.nn.functional as F

    kernel = kernel.detach().to(torch.float64)
    n = geometry.dim_in
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *geometry.input_shape()[1:])
    mode = {"zeros": "constant"}.get(geometry.padding_mode, geometry.padding_mode)
    padded = F.pad(basis, geometry.pad, mode=mode)
    out = F.conv2d(padded, kernel, None, geometry.stride, 0, geometry.dilation, geometry.groups)
    return out.reshape(n, -1).T


def singular_values(geometry, kernel: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(explicit_matrix(geometry, kernel))


def stable_rank(geometry, kernel: torch.Tensor) -> float:
    s = singular_values(geometry, kernel)
    return float((s**2).sum() / s[0] ** 2)


def refreshed_layers(geometry, n_layers, variant, beta, generator):
    """``n_layers`` random float64 kernels with converged power-iteration kernels, stacked:
    ``(kernels, s1, s1_out)``, each ``(L, C_out, C_in/g, kh, kw)`` (realistic op arguments)."""
    from srnc_ext import reference

    kernels, s1s, s1_outs = [], [], []
    for _ in range(n_layers):
        k = torch.randn(geometry.weight_shape, dtype=torch.float64, generator=generator)
        u = torch.randn(geometry.output_shape(), dtype=torch.float64, generator=generator)
        v = torch.randn(geometry.input_shape(), dtype=torch.float64, generator=generator)
        u, v = reference.power_iteration(k, u, v, geometry, 20, 1e-12)
        s1 = reference.rank_one_kernel(u, v, geometry)
        rw = reference.reweighted_kernel(k, s1, geometry, beta=beta, eps=1e-12, variant=variant)
        u2, v2 = reference.power_iteration(rw, u, v, geometry, 20, 1e-12)
        kernels.append(k), s1s.append(s1), s1_outs.append(reference.rank_one_kernel(u2, v2, geometry))
    return torch.stack(kernels), torch.stack(s1s), torch.stack(s1_outs)
