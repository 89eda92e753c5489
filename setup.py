"""Build script for srnc_ext, including its compiled ops ``srnc_ext._C`` (csrc/).

Install for development with ``pip install --no-build-isolation -e .`` after
``pip install -r requirements-dev.txt`` (torch must come from the environment, not from a
temporary build environment). The package itself supports torch >= 2.6.

The CPU ops are always built. The CUDA ops are built too when a CUDA toolkit (``$CUDA_HOME``,
``$CUDA_PATH`` or ``/usr/local/cuda``, with ``bin/nvcc``) matches a CUDA build of torch.
``SRNC_BUILD_CUDA=1`` requires them (the build fails otherwise), ``SRNC_BUILD_CUDA=0`` skips them.
With no GPU visible, ``TORCH_CUDA_ARCH_LIST`` defaults to ``8.0;9.0``.
"""
import os
import re
import subprocess

from setuptools import find_packages, setup


def cuda_toolkit():
    """The first of $CUDA_HOME, $CUDA_PATH, /usr/local/cuda holding bin/nvcc (`which nvcc` may be a wrapper)."""
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return root
    return None


def cuda_build_home():
    """The toolkit to build the CUDA ops with, or None for a CPU-only build (see the docstring)."""
    mode = os.environ.get("SRNC_BUILD_CUDA", "")
    if mode == "0":
        return None
    import torch

    home, why = cuda_toolkit(), None
    if torch.version.cuda is None:
        why = f"torch {torch.__version__} is not a CUDA build"
    elif home is None:
        why = "no CUDA toolkit with bin/nvcc in $CUDA_HOME, $CUDA_PATH or /usr/local/cuda"
    else:
        release = re.search(r"release (\d+)\.", subprocess.check_output([os.path.join(home, "bin", "nvcc"), "--version"], text=True))
        if release and release.group(1) != torch.version.cuda.split(".")[0]:
            why = f"the CUDA {release.group(1)} toolkit in {home} does not match torch's CUDA {torch.version.cuda}"
    if why is None:
        return home
    if mode == "1":
        raise RuntimeError(f"SRNC_BUILD_CUDA=1 but the CUDA ops cannot be built: {why}")
    print(f"srnc_ext: building the CPU ops only: {why}")
    return None


def torch_has_openmp() -> bool:
    import torch

    return bool(getattr(torch._C, "has_openmp", False))


def extensions():
    home = cuda_build_home()
    if home:
        os.environ["CUDA_HOME"] = home  # read by torch.utils.cpp_extension at import
        import torch

        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"  # unset with no GPU visible crashes the build
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, is_ninja_available

    try:  # the `ninja` wheel (requirements-dev.txt) puts its binary where PATH may not look
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    # at::parallel_for only runs in parallel when the extension is compiled with the OpenMP that
    # torch's ATen uses (its header's `#pragma omp parallel` is ignored otherwise): -fopenmp.
    cxx = ["-O3"] + (["-fopenmp"] if torch_has_openmp() else [])
    # No -std: cpp_extension picks the one the installed torch's headers need (C++20 for 2.14,
    # C++17 for 2.6); csrc/ is valid C++17.
    if home:
        ext = CUDAExtension(
            "srnc_ext._C", ["csrc/srnc_ops.cpp", "csrc/srnc_ops_cuda.cu"],
            extra_compile_args={"cxx": cxx + ["-DSRNC_WITH_CUDA"], "nvcc": ["-O3"]},
            extra_link_args=cxx[1:],
        )
    else:
        ext = CppExtension("srnc_ext._C", ["csrc/srnc_ops.cpp"], extra_compile_args={"cxx": cxx}, extra_link_args=cxx[1:])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=is_ninja_available())}


ext_modules, cmdclass = extensions()

setup(
    name="srnc_ext",
    version="0.1.0",
    description="Stable Rank Normalization for Convolutional layers (SRN-C) for recurrent video models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # training/ (the models, data and CLI of `python -m training.run`) ships beside the library: the
    # benchmarks and docs/ import its models. It is Python only (its clips come from scikit-image's
    # bundled images), so it needs no package data. srnc_ext never imports it.
    packages=find_packages(include=["srnc_ext", "srnc_ext.*", "training", "training.*"]),
    install_requires=["torch>=2.6", "numpy", "scipy>=1.8"],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4"],
        "training": ["scikit-image>=0.22", "pillow>=10", "matplotlib>=3.7", "tensorboard>=2.14"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
