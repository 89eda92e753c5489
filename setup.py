"""Build script for srnc_ext, including its compiled ops ``srnc_ext._C`` (srnc_ext/csrc/).

Two ways to install, both from the repository root:

- ``pip install --no-build-isolation -e .`` (or without ``-e``), after
  ``pip install -r requirements-dev.txt``: the ops are compiled now, against the torch of the
  environment (the development and CI install).
- ``pip install .`` (pip's build isolation: the build cannot import torch): a pure-Python package
  that carries the C++/CUDA sources (``srnc_ext/csrc/``, package data); they compile at first use,
  against the installed torch, into torch's extension cache (``srnc_ext/_jit_build.py``).

The package itself supports torch >= 2.6. The CPU ops are always built. The CUDA ops are built too
when a CUDA toolkit (``$CUDA_HOME``, ``$CUDA_PATH`` or ``/usr/local/cuda``, with ``bin/nvcc``)
matches a CUDA build of torch. ``SRNC_BUILD_CUDA=1`` requires them (the build fails otherwise),
``SRNC_BUILD_CUDA=0`` skips them. With no GPU visible, ``TORCH_CUDA_ARCH_LIST`` defaults to
``8.0;9.0``. These decisions live in ``srnc_ext/_jit_build.py``, shared with the first-use build.
"""
import contextlib
import importlib.util
import os
import sys

from setuptools import find_packages, setup

_spec = importlib.util.spec_from_file_location(
    "_srnc_build", os.path.join(os.path.dirname(os.path.abspath(__file__)), "srnc_ext", "_jit_build.py"))
build = importlib.util.module_from_spec(_spec)  # by path: importing srnc_ext would import torch
_spec.loader.exec_module(build)


def extensions(stack: contextlib.ExitStack):
    """(ext_modules, cmdclass): the compiled ops when torch is importable (their build environment
    entered on ``stack``: ninja on PATH, CUDA_HOME, TORCH_CUDA_ARCH_LIST), else none."""
    try:
        import torch
    except ImportError:
        print("srnc_ext: torch is not importable in this build (pip's build isolation): installing the C++/CUDA "
              "sources, which compile at first use against the installed torch (`pip install "
              "--no-build-isolation .` compiles them now)", file=sys.stderr)
        return [], {}
    home = build.cuda_build_home(torch)
    stack.enter_context(build.build_environment(torch, home))  # before cpp_extension is imported (CUDA_HOME)
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, is_ninja_available

    cxx, ldflags = build.compile_flags(torch, bool(home))
    srcs = build.sources(bool(home), root="srnc_ext/csrc")  # setuptools wants paths relative to setup.py
    if home:
        ext = CUDAExtension("srnc_ext._C", srcs, extra_compile_args={"cxx": cxx, "nvcc": build.NVCC_FLAGS},
                            extra_link_args=ldflags)
    else:
        ext = CppExtension("srnc_ext._C", srcs, extra_compile_args={"cxx": cxx}, extra_link_args=ldflags)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=is_ninja_available())}


with contextlib.ExitStack() as stack:
    ext_modules, cmdclass = extensions(stack)
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
        # The ops' sources ship in every install: a wheel built without torch compiles them at first use.
        package_data={"srnc_ext": [f"csrc/{name}" for name in build.CPU_SOURCES + build.CUDA_SOURCES + build.HEADERS]},
        # ninja: torch.utils.cpp_extension.load, the first-use build, requires it
        install_requires=["torch>=2.6", "numpy", "scipy>=1.8", "ninja"],
        extras_require={
            "test": ["pytest>=7", "pytest-benchmark>=4"],
            "training": ["scikit-image>=0.22", "pillow>=10", "matplotlib>=3.7", "tensorboard>=2.14"],
        },
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
