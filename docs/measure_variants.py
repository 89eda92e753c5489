"""Measure sigma_1 and the stable rank of the final operator of SRN-C against beta, both variants.

Exact spectra from the explicit operator matrix (float64 SVD); the power iterations are run to
convergence (500 steps) so that the table shows the algorithm, not the iteration's lag.
Run: ``python docs/measure_variants.py`` (CPU, about a minute). Prints a Markdown table.
"""
import torch

from srnc_ext import SRNCConv2d, spectral

CONFIGS = [  # (label, in, out, input_size, conv kwargs)
    ("8->8, 3x3, 16x16, circular", 8, 8, 16, dict(padding=1, padding_mode="circular")),
    ("8->8, 3x3, 16x16, zeros", 8, 8, 16, dict(padding=1)),
    ("8->8, 3x3, 16x16, zeros, stride 2", 8, 8, 16, dict(padding=1, stride=2)),
    ("4->8, 3x3, 12x12, reflect", 4, 8, 12, dict(padding=1, padding_mode="reflect")),
]
BETAS = (1.0, 0.4, 0.1, 0.05, 0.01)


def measure(c_in, c_out, size, kwargs, variant, beta, alpha=1.0, seed=0):
    torch.manual_seed(seed)
    layer = SRNCConv2d(c_in, c_out, 3, alpha=alpha, beta=beta, input_size=size, n_power_iterations=500,
                       variant=variant, dtype=torch.float64, **kwargs)
    layer.refresh()
    result = spectral.spectrum(layer, method="matrix")
    return result.sigma_max, result.stable_rank, layer.geometry.full_rank


def main():
    print("| layer | variant | " + " | ".join(f"beta={b}" for b in BETAS) + " |")
    print("|---|---|" + "---|" * len(BETAS))
    for label, c_in, c_out, size, kwargs in CONFIGS:
        for variant in ("projected", "paper"):
            cells = []
            for beta in BETAS:
                sigma, srank, full = measure(c_in, c_out, size, kwargs, variant, beta)
                cells.append(f"{sigma:.3f} / {srank:.0f} ({beta * full:.0f})")
            print(f"| {label} | {variant} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
