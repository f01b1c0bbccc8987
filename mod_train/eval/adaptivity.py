"""How token-adaptive a MoD model's routing is, from the realised execution rate of each routed layer.

    ad = adaptivity({2: 1.0, 3: 0.0, 4: 0.55}, skipped_kv="drop", num_layers=6)
    ad["verdict"], ad["partial_compute_share"], ad["kv_fraction"]       # markdown: section(ad, "unseen text")

A routed layer that runs (nearly) every token is a kept layer, one that runs (nearly) none a deleted one: a
model whose routed layers all sit at the ends is static depth pruning, whatever its routers. The rules
(lo = 0.1, hi = 0.9 by default):
- a routed layer is skipped when rate <= lo, partly run when lo < rate < hi, full when rate >= hi;
- partial_compute_share = sum of the partly-run layers' rates / sum of all routed layers' rates (0 when that
  sum is 0): the share of the routed compute that depends on the token;
- histogram: routed layers per rate bin [0, 0.1), [0.1, 0.2), ..., [0.9, 1.0] (rate 1.0 in the last bin);
- mean_rate: the unweighted mean over routed layers (in an evaluation every layer sees the same tokens);
- kv_fraction: KV-cache entries stored / the dense model's over all `num_layers` decoder layers. A layer that
  is not routed stores every token; a routed layer stores `rate` of them when skipped tokens store no KV
  (skipped_kv='drop'), every token when they do ('keep') unless it is off (p = 1: it stores nothing). Off
  layers are given by `off`; without it, those at rate exactly 0 count as off (a layer that merely ran no
  token of this text still stores every token in 'keep' mode: pass `off` for the exact fraction).
"""
from __future__ import annotations

from pathlib import Path

BINS = 10
"""Rate histogram bins over [0, 1], each 1 / BINS wide."""
SKIPPED_KV = ("drop", "keep")
"""What a routed layer stores for the tokens it skips: nothing ('drop') or their keys and values ('keep')."""


def _bin(rate: float) -> int:
    """Histogram bin of a rate: floor(rate * BINS) (rounded first, so 0.3 lands in [0.3, 0.4)); 1.0 in the last."""
    return max(0, min(int(round(rate * BINS, 9)), BINS - 1))


def kv_fraction(rates: dict[int, float], num_layers: int, skipped_kv: str = "drop",
                off: set[int] | None = None) -> float:
    """KV-cache entries stored / the dense model's, for `num_layers` decoder layers of which `rates` are routed
    and `off` (default: those at rate 0) are off."""
    if skipped_kv not in SKIPPED_KV:
        raise ValueError(f"skipped_kv={skipped_kv!r}: choose one of {', '.join(map(repr, SKIPPED_KV))}")
    if num_layers < len(rates):
        raise ValueError(f"num_layers={num_layers} is below the {len(rates)} routed layers")
    off = {j for j, r in rates.items() if r == 0} if off is None else set(off)
    stored = sum(r if skipped_kv == "drop" else float(j not in off) for j, r in rates.items())
    return (num_layers - len(rates) + stored) / num_layers


def adaptivity(rates: dict[int, float], skipped_kv: str = "drop", num_layers: int | None = None, lo: float = 0.1,
               hi: float = 0.9, off: set[int] | None = None) -> dict:
    """How token-adaptive routing with these realised rates per routed layer is (rules: the module docstring)."""
    vals = list(rates.values())
    counts = [0] * BINS
    for r in vals:
        counts[_bin(r)] += 1
    partial = [r for r in vals if lo < r < hi]
    total = sum(vals)
    share = sum(partial) / total if total > 0 else 0.0
    verdict = (f"token-adaptive: {share:.1%} of routed compute in partly-run layers" if partial else
               f"static (every routed layer at rate <= {lo:g} or >= {hi:g})")
    return {"rates": dict(rates), "lo": lo, "hi": hi, "skipped_kv": skipped_kv, "num_layers": num_layers,
            "histogram": {"edges": [k / BINS for k in range(BINS + 1)], "counts": counts},
            "n_skipped": sum(r <= lo for r in vals), "n_partial": len(partial), "n_full": sum(r >= hi for r in vals),
            "partial_compute_share": share, "mean_rate": total / len(vals) if vals else 0.0,
            "kv_fraction": None if num_layers is None else kv_fraction(rates, num_layers, skipped_kv, off),
            "verdict": verdict}


def summary(ad: dict) -> str:
    """One line: the verdict, how many routed layers run partly and the share of routed compute they hold."""
    n = ad["n_skipped"] + ad["n_partial"] + ad["n_full"]
    return (f"{ad['verdict']}; {ad['n_partial']} of {n} routed layers partly run ({ad['lo']:g} < rate < "
            f"{ad['hi']:g}), partial compute share {ad['partial_compute_share']:.3f}")


def histogram_png(rates: dict[int, float], path: Path, title: str = "routed layers per execution rate") -> None:
    """Bar chart of the number of routed layers in each rate bin of width 1 / BINS."""
    from mod_train.eval.plots import rate_histogram
    ad = adaptivity(rates)
    rate_histogram(ad["histogram"]["counts"], ad["histogram"]["edges"], path, (ad["lo"], ad["hi"]), title)


def section(ad: dict, title: str) -> list[str]:
    """Markdown of an adaptivity() result under a '### title' heading: rates per layer, histogram, verdict."""
    layers = sorted(ad["rates"], key=int)  # int keys, or str once read back from results.json
    edges, counts = ad["histogram"]["edges"], ad["histogram"]["counts"]
    L = [f"\n### {title}\n",
         "| layer | " + " | ".join(str(j) for j in layers) + " |", "|---|" + "---|" * len(layers),
         "| rate | " + " | ".join(f"{ad['rates'][j]:.2f}" for j in layers) + " |", "",
         "| rate bin | " + " | ".join(f"{a:.1f}-{b:.1f}" for a, b in zip(edges, edges[1:])) + " |",
         "|---|" + "---|" * len(counts), "| routed layers | " + " | ".join(map(str, counts)) + " |", "",
         f"- skipped (rate <= {ad['lo']:g}): {ad['n_skipped']}, partly run ({ad['lo']:g} < rate < {ad['hi']:g}): "
         f"{ad['n_partial']}, full (rate >= {ad['hi']:g}): {ad['n_full']}; mean rate {ad['mean_rate']:.3f}",
         f"- share of the routed compute in partly-run layers: {ad['partial_compute_share']:.3f}"]
    if ad["kv_fraction"] is not None:
        L.append(f"- KV cache / dense over all {ad['num_layers']} layers (skipped tokens' KV: {ad['skipped_kv']}): "
                 f"{ad['kv_fraction']:.3f}")
    L.append(f"- **{ad['verdict']}**")
    return L
