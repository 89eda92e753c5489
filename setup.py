"""Build script for srnc_ext.

Install for development with ``pip install --no-build-isolation -e .`` after
``pip install -r requirements-dev.txt`` (torch must come from the environment, not from a
temporary build environment). The package itself supports torch >= 2.6.
"""
from setuptools import find_packages, setup

setup(
    name="srnc_ext",
    version="0.1.0",
    description="Stable Rank Normalization for Convolutional layers (SRN-C) for recurrent video models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["srnc_ext", "srnc_ext.*"]),
    install_requires=["torch>=2.6", "numpy", "scipy>=1.8"],
    extras_require={"test": ["pytest>=7", "pytest-benchmark>=4"]},
)
