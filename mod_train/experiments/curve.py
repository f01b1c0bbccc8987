"""Quality against compute: held-out perplexity (in-domain and unseen domains) against the KV-cache saving, for
the MoD recipe and static depth pruning at the same budgets, from ablation results (launch/curve.py).

    python launch/curve.py --results [runs/c4/results.json,runs/abl9_7/results.json,...] --out docs/curve

Each results.json (mod_train/experiments/ablate.py) holds one budget: the MoD variant (`mod_variant`), and the
pruned variants at its compute. The x axis is dense KV bytes over the model's KV bytes, the ideal from counting
(MoD: 1 / (1 - rho (1 - r)) at the rate r realised on that text; pruning: L / (L - deleted)); the dense model is
the point (1, dense ppl). Writes <out>.png and <out>.md (the table) and returns the rows.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SERIES = {"mod": "MoD (recipe, trained)", "pruned_trained": "static pruning, trained the same",
          "pruned": "static pruning, untrained"}


@dataclass
class CurveConfig:
    results: list[str] = field(default_factory=list)
    """Ablation results.json files, one budget each (a file without a MoD or pruned row only adds what it has)."""
    mod_variant: str = "threshold"
    """The variant holding the MoD recipe in every file."""
    extra_variants: dict[str, str] = field(default_factory=dict)
    """More MoD variants drawn as their own series: {variant name: label} (files without one skip it)."""
    out: str = "runs/curve"
    """Output prefix: <out>.png and <out>.md."""


def _kv_saving(row: dict, unseen: bool) -> float:
    if "layers_deleted" in row:
        return (row["layers"] + len(row["layers_deleted"])) / row["layers"]
    return 1.0 / row["kv_ideal_unseen" if unseen and "kv_ideal_unseen" in row else "kv_ideal"]


def collect(cfg: CurveConfig) -> tuple[dict | None, list[dict]]:
    """(dense row or None, one row per series and budget), sorted by series then KV saving."""
    dense, rows = None, []
    for path in cfg.results:
        res = json.loads(Path(path).read_text())
        v = res["variants"]
        dense = dense or v.get("dense")
        extras = [(f"extra:{n}", n) for n in cfg.extra_variants]
        for key, name in [("mod", cfg.mod_variant), *extras, ("pruned_trained", "pruned_trained"), ("pruned", "pruned")]:
            r = v.get(name)
            if r is None:
                continue
            rows.append({"series": key, "label": SERIES.get(key) or cfg.extra_variants[name], "source": str(path), "steps": res["config"]["steps"],
                         "seq_len": res["config"]["seq_len"], "kv_saving": _kv_saving(r, False),
                         "kv_saving_unseen": _kv_saving(r, True), "rate": r.get("rate"),
                         "rate_unseen": r.get("rate_unseen"), "ppl": r["ppl"], "ppl_unseen": r.get("ppl_unseen"),
                         "layers_deleted": len(r.get("layers_deleted", []))})
    order = ["mod", *[f"extra:{n}" for n in cfg.extra_variants], "pruned_trained", "pruned"]
    rows.sort(key=lambda r: (order.index(r["series"]), r["kv_saving"]))
    return dense, rows


def _f(x, fmt=".2f") -> str:
    return "-" if x is None else format(x, fmt)


def render(dense: dict | None, rows: list[dict]) -> str:
    lines = ["| model | KV saving (in-domain / unseen) | realised rate (in / unseen) | in-domain ppl | unseen ppl |"
             " in / dense | unseen / dense | tokens trained |", "|---|---|---|---:|---:|---:|---:|---|"]
    if dense:
        lines.append(f"| dense | 1.00x / 1.00x | 1 / 1 | {dense['ppl']:.2f} | {_f(dense.get('ppl_unseen'))} | 1.00 | 1.00 | - |")
    for r in rows:
        rate = "-" if r["series"].startswith("pruned") else f"{r['rate']:.3f} / {_f(r['rate_unseen'], '.3f')}"
        what = r["label"] + (f" ({r['layers_deleted']} layers deleted)" if r["layers_deleted"] else "")
        rel = "- | -" if not dense else f"{r['ppl'] / dense['ppl']:.2f} | " + \
            (_f(r["ppl_unseen"] / dense["ppl_unseen"]) if r["ppl_unseen"] and dense.get("ppl_unseen") else "-")
        tokens = "-" if r["series"] == "pruned" else f"{r['steps']} x {r['seq_len']}"
        lines.append(f"| {what} | {r['kv_saving']:.2f}x / {r['kv_saving_unseen']:.2f}x | {rate} | {r['ppl']:.2f} | "
                     f"{_f(r['ppl_unseen'])} | {rel} | {tokens} |")
    return "\n".join(lines) + "\n"


def plot(dense: dict | None, rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    for ax, unseen in zip(axes, (False, True)):
        ppl, kv = ("ppl_unseen", "kv_saving_unseen") if unseen else ("ppl", "kv_saving")
        for key in dict.fromkeys(r["series"] for r in rows):
            pts = sorted((r[kv], r[ppl]) for r in rows if r["series"] == key and r[ppl] is not None)
            if pts:
                style = {"mod": dict(marker="o", markersize=9, linewidth=3, alpha=0.6),
                         "pruned_trained": dict(marker="x", markersize=8, linewidth=1.2),
                         "pruned": dict(marker="o", linestyle=":")}.get(key, dict(marker="s", linewidth=1.5))
                ax.plot(*zip(*pts), label=next(r["label"] for r in rows if r["series"] == key), **style)
        if dense and dense.get(ppl):
            ax.plot([1.0], [dense[ppl]], marker="*", markersize=10, color="black", linestyle="", label="dense")
        ax.set_xlim(0.95, max([r[kv] for r in rows] + [1.2]) + 0.1)
        ax.ticklabel_format(axis="x", useOffset=False)
        ax.set_xlabel("KV cache saving vs dense (x)")
        ax.set_ylabel("held-out perplexity")
        ax.set_yscale("log")
        ax.set_title("unseen domains" if unseen else "in-domain held-out")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_curve(cfg: CurveConfig) -> list[dict]:
    from mod_train.config import ConfigError
    missing = [p for p in cfg.results if not Path(p).is_file()]
    if not cfg.results or missing:
        raise ConfigError(f"curve.results = {missing or cfg.results}: give existing ablation results.json files "
                          "(launch/ablate.py writes <out>/results.json)")
    dense, rows = collect(cfg)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(render(dense, rows))
    plot(dense, rows, str(out.with_suffix(".png")))
    return rows
