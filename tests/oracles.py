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
