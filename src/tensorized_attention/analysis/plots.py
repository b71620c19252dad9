"""The pictures of ``tensorized-attention analyze`` (matplotlib, Agg)."""

from __future__ import annotations

import torch

__all__ = ["plot_cp_factors", "plot_energy", "plot_folds", "plot_spectra"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fold_name(shape) -> str:
    return "x".join(map(str, shape))


def _colors(n):
    plt = _plt()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def plot_spectra(path, spectra: dict, *, title: str) -> str:
    """``spectra``: ``{panel: {"matrix": s, fold_name: s, ...}}`` (descending singular values):
    σ_i / σ_1 against i, log-log, one panel per key (e.g. average and one sample)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(spectra), figsize=(6.2 * len(spectra), 4.6), squeeze=False)
    for ax, (panel, curves) in zip(axes[0], spectra.items(), strict=True):
        folds = [k for k in curves if k != "matrix"]
        for name, color in zip(folds, _colors(len(folds)), strict=True):
            s = torch.as_tensor(curves[name], dtype=torch.float64)
            ax.loglog(torch.arange(1, len(s) + 1), (s / s[0]).clamp_min(1e-17), color=color, lw=1.3,
                      label=f"Kronecker {name}")
        s = torch.as_tensor(curves["matrix"], dtype=torch.float64)
        ax.loglog(torch.arange(1, len(s) + 1), (s / s[0]).clamp_min(1e-17), color="black", lw=2, label="matrix SVD")
        ax.set_ylim(bottom=1e-6, top=1.5)
        ax.set_xlabel("index i")
        ax.set_ylabel("σ_i / σ_1")
        ax.set_title(panel, fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    return _save(plt, fig, path, title)


def plot_energy(path, curves: dict, *, title: str) -> str:
    """``curves``: ``{panel: {label: [{"parameters", "energy"}, ...]}}``: energy captured
    against parameters (log x), one panel per key."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(curves), figsize=(6.2 * len(curves), 4.6), squeeze=False)
    for ax, (panel, lines) in zip(axes[0], curves.items(), strict=True):
        labels = [k for k in lines if k != "matrix SVD"]
        colors = dict(zip(labels, _colors(len(labels)), strict=True))
        for label, rows in lines.items():
            if not rows:
                continue
            x = [r["parameters"] for r in rows]
            y = [r["energy"] for r in rows]
            if label == "matrix SVD":
                ax.semilogx(x, y, color="black", lw=2, label=label)
            elif label.startswith("CP"):
                ax.semilogx(x, y, color=colors[label], ls=":", marker="o", ms=3, label=label)
            else:
                ax.semilogx(x, y, color=colors[label], marker="." if len(rows) < 20 else None, label=label)
        ax.set_xlabel("parameters of the approximation")
        ax.set_ylabel("share of the energy ||A||² captured")
        ax.set_ylim(0, 1.02)
        ax.set_title(panel, fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    return _save(plt, fig, path, title)


def plot_cp_factors(path, rows: dict, *, title: str) -> str:
    """``rows``: ``{panel: (A, approximation, fit)}`` with ``fit`` a ``kronecker`` CPFit: per
    panel, the map, its rank-R Kronecker sum, and each component's factor matrices
    ``A_1 ... A_m`` (signed colour scale, scaled by the component's weight)."""
    plt = _plt()
    from matplotlib.colors import LogNorm

    first = next(iter(rows.values()))[2]
    m, rank = len(first.shape), first.rank
    cols = 2 + rank * m
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.5 * cols, 1.9 * len(rows) + 0.6), squeeze=False)
    for axrow, (panel, (A, approx, fit)) in zip(axes, rows.items(), strict=True):
        floor = 1e-5
        axrow[0].imshow(A.clamp_min(floor).numpy(), norm=LogNorm(vmin=floor, vmax=1), cmap="magma",
                        interpolation="nearest")
        axrow[0].set_title(f"{panel}\nA (log)", fontsize=7)
        axrow[1].imshow(approx.abs().clamp_min(floor).numpy(), norm=LogNorm(vmin=floor, vmax=1), cmap="magma",
                        interpolation="nearest")
        axrow[1].set_title(f"rank-{rank} Kronecker\n{fit.energy:.1%} of the energy", fontsize=7)
        order = torch.argsort(fit.weights.abs(), descending=True)
        for slot, comp in enumerate(order.tolist()):
            factors = fit.kronecker_factors(comp)
            for j, F in enumerate(factors):
                ax = axrow[2 + slot * m + j]
                lim = float(F.abs().max()) or 1.0
                ax.imshow(F.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
                head = f"c{slot + 1} w={float(fit.weights[comp]):.3g}\n" if j == 0 else "\n"
                ax.set_title(f"{head}A_{j + 1} ({F.shape[0]}x{F.shape[0]})", fontsize=7)
        for ax in axrow:
            ax.set_xticks([])
            ax.set_yticks([])
    return _save(plt, fig, path, title, fontsize=9)


def plot_folds(path, layers: list[int], panels: dict, *, title: str) -> str:
    """``panels``: ``{ylabel: {label: [value per layer]}}``: one panel per key, a line per
    fold (or variant) against the layer."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.4), squeeze=False)
    for ax, (ylabel, lines) in zip(axes[0], panels.items(), strict=True):
        for (label, values), color in zip(lines.items(), _colors(len(lines)), strict=True):
            ls = "--" if label.startswith(("window", "matrix")) else "-"
            ax.plot(layers, values, color="black" if label.startswith("matrix") else color, ls=ls, marker=".",
                    label=label)
        ax.set_xlabel("layer")
        ax.set_ylabel(ylabel, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, ncol=2 if len(lines) > 6 else 1)
    return _save(plt, fig, path, title)


def _save(plt, fig, path, title, fontsize=10) -> str:
    """Title the figure, write it to ``path`` and close it."""
    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path)
