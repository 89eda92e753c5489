"""What only the compiled ops (``srnc_ext._C`` or its first-use build, srnc_ext/csrc/) have: the C++
``TORCH_CHECK`` guards behind ``torch.ops.srnc_ext`` called directly, and the CUDA build. Their numerics, layouts, opcheck and
contract are tested with the other backends in ``test_ops_backends.py``."""
import os
import re
import subprocess

import pytest
import torch
from op_harness import F64, op_case

from srnc_ext.ops import compiled

if not compiled.AVAILABLE:
    pytest.skip(f"srnc_ext._C is not built ({compiled.IMPORT_ERROR}); {compiled.REBUILD_HINT}", allow_module_level=True)


def _bad(**changes):
    c = op_case(3, "3x3", "projected")
    args = {**c.cast(F64), **c.scalars}
    for name, change in changes.items():
        args[name] = change(args.get(name, 0.0))  # floor: not in op_case's scalars (default 0)
    return args


BAD = {
    "kernel dims": (dict(kernel=lambda k: k[0]), "kernel must be (L, M, T)"),
    "s1 shape": (dict(s1=lambda x: x[:, :-1]), "s1 must have kernel's shape"),
    "direction dtype": (dict(direction=lambda x: x.float()), "direction must have kernel's dtype"),
    "s1_out shape": (dict(s1_out=lambda x: x[:2]), "s1_out must have kernel's shape"),
    "kernel dtype": (dict(kernel=lambda x: x.long(), s1=lambda x: x.long(), direction=lambda x: x.long(),
                          s1_out=lambda x: x.long()), "kernel must be float16, bfloat16, float32 or float64"),
    "gram shape": (dict(gram=lambda g: g[:-1]), "gram must be (T, T)"),
    "consts shape": (dict(consts=lambda c: c[:, :1]), "consts must be (L, 2)"),
    "consts layers": (dict(consts=lambda c: c[:2]), "consts must be (L, 2)"),
    "variant": (dict(variant=lambda v: 3), "variant must be 0"),
    "floor": (dict(floor=lambda f: -1.0), "floor must be finite and >= 0"),
    "floor nan": (dict(floor=lambda f: float("nan")), "floor must be finite and >= 0"),
    "device": (dict(s1=lambda x: x.to("meta")), "s1 must be on kernel's device"),
}


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_bad_inputs_name_the_argument(case):
    changes, message = case
    with pytest.raises(RuntimeError, match=re.escape(message)):
        torch.ops.srnc_ext.reweight_forward(**_bad(**changes))


def test_bad_backward_and_normalize_inputs():
    c = op_case(3, "3x3", "projected")
    tensors, grad = c.cast(F64), c.grad
    stats = torch.zeros(3, 3, dtype=F64)
    with pytest.raises(RuntimeError, match="stats must be \\(L, 3\\)"):
        torch.ops.srnc_ext.reweight_backward(grad, **tensors, stats=stats[:, :2], **c.scalars)
    with pytest.raises(RuntimeError, match="grad must have kernel's shape"):
        torch.ops.srnc_ext.reweight_backward(grad[:, 1:], **tensors, stats=stats, **c.scalars)
    x = torch.randn(4, 9, dtype=F64)
    with pytest.raises(RuntimeError, match="x must be \\(L, N\\) or \\(P, L, M\\)"):
        torch.ops.srnc_ext.normalize_segments(x[0], x[0], 1e-12)
    with pytest.raises(RuntimeError, match="x must be \\(L, N\\) or \\(P, L, M\\)"):
        torch.ops.srnc_ext.normalize_segments(x[None, None], x[None, None], 1e-12)
    with pytest.raises(RuntimeError, match="fallback must have x's dtype"):
        torch.ops.srnc_ext.normalize_segments(x, x.float(), 1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_op_rejects_mixed_devices():
    args = _bad(kernel=lambda k: k.cuda(), direction=lambda x: x.cuda(), s1_out=lambda x: x.cuda(),
                gram=lambda g: g.cuda(), consts=lambda c: c.cuda())
    with pytest.raises(RuntimeError, match="s1 must be on kernel's device"):
        torch.ops.srnc_ext.reweight_forward(**args)


def _cuda_buildable():
    """Mirror of setup.py: a CUDA torch, a toolkit with bin/nvcc of the same major version, not disabled."""
    if torch.version.cuda is None or os.environ.get("SRNC_BUILD_CUDA") == "0":
        return False
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        nvcc = os.path.join(root or "", "bin", "nvcc")
        if root and os.path.isfile(nvcc):
            release = re.search(r"release (\d+)\.", subprocess.check_output([nvcc, "--version"], text=True))
            return release is None or release.group(1) == torch.version.cuda.split(".")[0]
    return False


def test_cuda_kernels_registered_when_buildable():
    if not _cuda_buildable():
        pytest.skip("no CUDA build of torch with a matching toolkit, or SRNC_BUILD_CUDA=0: CPU-only build expected")
    assert compiled.has_cuda_kernels(), "setup.py could build the CUDA ops but the extension has none: rebuild"
