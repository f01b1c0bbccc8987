"""How token-adaptive a routing is (mod_train/eval/adaptivity.py): counts, partial compute share, KV fraction in
both skipped_kv modes and the verdict against hand-computed values; the markdown section; the histogram PNG."""
import json

import pytest

from mod_train.eval.adaptivity import adaptivity, histogram_png, kv_fraction, section, summary

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_layers_at_the_ends_are_static_depth_pruning():
    rates = {2: 1.0, 3: 0.0, 4: 0.05, 5: 0.95}
    ad = adaptivity(rates, num_layers=8)
    assert (ad["n_skipped"], ad["n_partial"], ad["n_full"]) == (2, 0, 2)
    assert ad["partial_compute_share"] == 0.0
    assert ad["verdict"] == "static (every routed layer at rate <= 0.1 or >= 0.9)"
    assert ad["histogram"]["counts"] == [2, 0, 0, 0, 0, 0, 0, 0, 0, 2]  # 0.0 first bin, 1.0 last bin
    assert ad["histogram"]["edges"] == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert ad["mean_rate"] == pytest.approx(0.5)
    # 4 dense layers store every token; drop: 1 + 0 + 0.05 + 0.95; keep: every token unless the rate is 0
    assert ad["kv_fraction"] == pytest.approx((4 + 2.0) / 8)
    assert adaptivity(rates, "keep", 8)["kv_fraction"] == pytest.approx((4 + 3) / 8)
    assert ad["rates"] == rates and adaptivity(rates)["kv_fraction"] is None


def test_partly_run_layers_hold_their_share_of_the_routed_compute():
    rates = {0: 1.0, 1: 0.5, 2: 0.25, 3: 0.0, 4: 0.1, 5: 0.9}  # 0.1 and 0.9 are the ends, not partial
    ad = adaptivity(rates, num_layers=6)
    assert (ad["n_skipped"], ad["n_partial"], ad["n_full"]) == (2, 2, 2)
    assert ad["partial_compute_share"] == pytest.approx(0.75 / 2.75)
    assert ad["verdict"] == "token-adaptive: 27.3% of routed compute in partly-run layers"
    assert ad["histogram"]["counts"] == [1, 1, 1, 0, 0, 1, 0, 0, 0, 2]
    assert ad["mean_rate"] == pytest.approx(2.75 / 6)
    assert ad["kv_fraction"] == pytest.approx(2.75 / 6)  # every layer routed
    assert kv_fraction(rates, 6, "keep") == pytest.approx(5 / 6)
    assert summary(ad) == ("token-adaptive: 27.3% of routed compute in partly-run layers; 2 of 6 routed layers "
                           "partly run (0.1 < rate < 0.9), partial compute share 0.273")
    wide = adaptivity(rates, lo=0.05, hi=0.95)  # the band is a parameter
    assert wide["n_partial"] == 4 and wide["partial_compute_share"] == pytest.approx(1.75 / 2.75)


def test_keep_mode_stores_every_token_except_in_off_layers():
    rates = {1: 0.0, 2: 0.0, 3: 0.5}  # layer 1 off (p = 1); layer 2 merely ran no token of this text
    assert kv_fraction(rates, 4, "keep", off={1}) == pytest.approx((1 + 0 + 1 + 1) / 4)
    assert kv_fraction(rates, 4, "keep") == pytest.approx((1 + 0 + 0 + 1) / 4)  # without `off`: rate 0 is off
    assert kv_fraction(rates, 4, "drop", off={1}) == kv_fraction(rates, 4, "drop") == pytest.approx(1.5 / 4)
    assert adaptivity(rates, "keep", 4, off={1})["kv_fraction"] == pytest.approx(0.75)


def test_bin_edges_and_degenerate_cases():
    ad = adaptivity({0: 0.3, 1: 0.7, 2: 0.6, 3: 0.2999})
    assert ad["histogram"]["counts"] == [0, 0, 1, 1, 0, 0, 1, 1, 0, 0]  # a rate on an edge opens its bin
    off = adaptivity({1: 0.0, 3: 0.0}, "keep", 4)
    assert off["partial_compute_share"] == 0.0 and off["verdict"].startswith("static") and off["kv_fraction"] == 0.5
    with pytest.raises(ValueError, match="skipped_kv"):
        adaptivity({1: 0.5}, "evict", 4)
    with pytest.raises(ValueError, match="num_layers"):
        kv_fraction({1: 0.5, 2: 0.5}, 1)


def test_section_markdown_and_json_round_trip():
    ad = adaptivity({2: 1.0, 3: 0.5}, "keep", 4)
    md = section(ad, "Unseen-domain text")
    assert md[0] == "\n### Unseen-domain text\n"
    assert "| layer | 2 | 3 |" in md and "| rate | 1.00 | 0.50 |" in md
    assert "| routed layers | 0 | 0 | 0 | 0 | 0 | 1 | 0 | 0 | 0 | 1 |" in md
    assert any("partly run (0.1 < rate < 0.9): 1" in ln for ln in md)
    assert "- KV cache / dense over all 4 layers (skipped tokens' KV: keep): 1.000" in md
    assert md[-1] == f"- **{ad['verdict']}**"
    assert section(json.loads(json.dumps(ad)), "Unseen-domain text") == md  # layers keyed by str in results.json


def test_histogram_png_is_written(tmp_path):
    import matplotlib.image
    path = tmp_path / "adaptivity.png"
    histogram_png({2: 1.0, 3: 0.5, 4: 0.0, 5: 0.45}, path)
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000
    assert matplotlib.image.imread(str(path)).ndim == 3
