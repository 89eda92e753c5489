"""How far sigma_1 of the trained layers drifts from alpha, against n_power_iterations.

Trains the demo's feature-recurrent denoiser (16 channels, 32x32 crops, batch 4, 5 frames,
Adam lr 1e-3, 200 steps) with SRN-C and reports, per setting, the largest and the median of
sigma_1(W_eff) / alpha over its 6 layers, measured with ARPACK (tol 1e-8) on the final weights
with the vectors of the last refresh, as the next training forward would use them (the one-step
lag included), and after ``refresh(500)``. Run: ``python docs/measure_tracking.py`` (CPU, a few minutes).
"""
import statistics
import time

import torch

from srnc_ext import SRNCConv2d, convert, demo, spectral


def run(alpha, beta, n_iterations, steps=200, seed=0):
    torch.manual_seed(seed)
    model = demo.FeatureRecurrentNet(16)
    convert(model, alpha=alpha, beta=beta, input_size=32, n_power_iterations=n_iterations)
    start = time.perf_counter()
    demo.train(model, steps, torch.Generator().manual_seed(seed))
    seconds = time.perf_counter() - start
    layers = [m for m in model.modules() if isinstance(m, SRNCConv2d)]
    lagged = [spectral.spectral_norm(m, method="arpack") / alpha for m in layers]
    for m in layers:
        m.refresh(500)
    settled = [spectral.spectral_norm(m, method="arpack") / alpha for m in layers]
    return max(lagged), statistics.median(lagged), max(settled), seconds


def main():
    print("| alpha | beta | n_power_iterations | max sigma_1/alpha | median | after refresh(500): max | train time (s) |")
    print("|---|---|---|---|---|---|---|")
    for alpha, beta in ((1.0, 1.0), (2.0, 0.1)):
        for n in (1, 2, 4, 8, 16):
            worst, median, settled, seconds = run(alpha, beta, n)
            print(f"| {alpha} | {beta} | {n} | {worst:.3f} | {median:.3f} | {settled:.4f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
