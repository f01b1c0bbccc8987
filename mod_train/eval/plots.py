"""PNG plots of an evaluation (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def rate_per_layer(rates: dict[int, dict[int, float]], path: Path, title: str = "execution rate per routed layer"):
    """rates: {context length: {layer: rate}} -> grouped bar chart."""
    plt = _plt()
    lengths = sorted(rates)
    layers = sorted({j for r in rates.values() for j in r})
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(layers) * max(1, len(lengths))), 3.5))
    w = 0.8 / max(1, len(lengths))
    x = np.arange(len(layers))
    for k, L in enumerate(lengths):
        ax.bar(x + k * w, [rates[L].get(j, np.nan) for j in layers], w, label=f"ctx {L}")
    ax.set_xticks(x + w * (len(lengths) - 1) / 2, [str(j) for j in layers])
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction of tokens executed")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def rate_schedule(metrics: dict[int, dict], path: Path) -> bool:
    """The training run's scheduled target rate (`routing/target`) against the realised mean rate
    (`routing/rate_mean`) per step, from metrics.jsonl records {step: metrics}; False if neither was logged."""
    steps = sorted(s for s, m in metrics.items() if "routing/rate_mean" in m or "routing/target" in m)
    if not steps:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for key, label, style in (("routing/target", "scheduled target", "--"), ("routing/rate_mean", "realised", "-")):
        pts = [(s, metrics[s][key]) for s in steps if key in metrics[s]]
        if pts:
            ax.plot(*zip(*pts), style, marker=".", label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean execution rate (routed layers)")
    ax.set_ylim(0, 1.05)
    ax.set_title("execution rate: schedule vs realised (training rows)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def routing_map(sel: np.ndarray, layers: list[int], path: Path, title: str = "tokens that ran each routed layer"):
    """sel [routed layers, positions] of 0/1 -> image (dark = executed)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, max(2.0, 0.25 * len(layers) + 1)))
    ax.imshow(sel, aspect="auto", interpolation="nearest", cmap="Greys", vmin=0, vmax=1)
    ax.set_yticks(range(len(layers)), [str(j) for j in layers], fontsize=7)
    ax.set_xlabel("token position")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def gate_histogram(hists: dict[int, list[int]], thresholds: dict[int, float], path: Path):
    """Gate distribution per routed layer (normalised), thresholds as dashed lines."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    edges = np.linspace(0, 1, len(next(iter(hists.values()))) + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    for j, h in sorted(hists.items()):
        h = np.asarray(h, dtype=float)
        ax.plot(centres, h / max(h.sum(), 1), label=f"L{j}", lw=1)
    for p in sorted(set(round(v, 4) for v in thresholds.values())):
        ax.axvline(p, ls="--", c="k", lw=0.8)
    ax.set_xlabel("gate g = sigmoid(w.h + b)")
    ax.set_ylabel("share of tokens")
    ax.set_yscale("log")
    ax.set_title("gate histogram (dashed: thresholds p)")
    if len(hists) <= 16:
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def quality_vs_memory(points: list[dict], dense_ppl: float, path: Path, length: int):
    """points: [{target, ppl, kv_measured, kv_ideal}] -> perplexity against KV memory (fraction of dense)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [p["kv_measured"] for p in points]
    ax.plot(xs, [p["ppl"] for p in points], "o-", label="MoD (measured KV)")
    ax.plot([p["kv_ideal"] for p in points], [p["ppl"] for p in points], "x:", c="gray",
            label="MoD (ideal KV 1-rho(1-r))")
    for p in points:
        ax.annotate(f"t={p['target']}", (p["kv_measured"], p["ppl"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.plot([1.0], [dense_ppl], "s", c="red", label="dense")
    ax.set_xlabel("KV-cache bytes / dense")
    ax.set_ylabel(f"held-out perplexity (ctx {length})")
    ax.set_title("quality against KV memory (calibrated targets)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def rate_histogram(counts: list[int], edges: list[float], path: Path, band: tuple[float, float],
                   title: str = "routed layers per execution rate"):
    """Routed layers per execution-rate bin (counts over edges); the partly-run band (lo, hi) shaded."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.axvspan(*band, color="tab:green", alpha=0.12, label=f"partly run ({band[0]:g} < rate < {band[1]:g})")
    ax.bar(edges[:-1], counts, np.diff(edges), align="edge", edgecolor="k", lw=0.6)
    ax.set_xlim(0, 1)
    ax.set_xlabel("execution rate (share of tokens that ran the layer)")
    ax.set_ylabel("routed layers")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
