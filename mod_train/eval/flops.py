"""Ideal costs from counting: FLOPs of attention + MLP (+ LM head) and KV-cache bytes.

These give the ratio a perfect MoD implementation would reach, printed beside every measured ratio.
Backward is ~2x forward for every term, so forward+backward ratios equal the forward ones.
"""
from __future__ import annotations


def _dims(config):
    d = config.hidden_size
    H = config.num_attention_heads
    Hkv = config.num_key_value_heads or H
    hd = getattr(config, "head_dim", None) or d // H
    return d, H, Hkv, hd, config.intermediate_size, config.vocab_size


def kv_token_flops(config) -> float:
    """Forward FLOPs of one token's K and V projections in one layer."""
    d, H, Hkv, hd, inter, _ = _dims(config)
    return 2 * 2 * d * Hkv * hd


def token_flops(config) -> float:
    """Forward FLOPs of one token through one layer's projections and MLP (no attention scores)."""
    d, H, Hkv, hd, inter, _ = _dims(config)
    return 2 * d * H * hd + kv_token_flops(config) + 2 * H * hd * d + 2 * 3 * d * inter


def attn_pair_flops(config) -> float:
    """FLOPs of one query-key pair (scores + weighted values)."""
    _, H, _, hd, _, _ = _dims(config)
    return 4 * H * hd


def prefill_flops(config, seq: int, rates: dict[int, float] | None = None, logits: int = 1,
                  keep: frozenset[int] = frozenset()) -> float:
    """Forward FLOPs of a causal prefill of `seq` tokens; routed layer j runs rates[j] of the tokens
    (its selected tokens attend causally to each other only). `logits`: tokens through the LM head.
    Layers in `keep` (skipped_kv 'keep') project every token's K/V and their selected queries see every key."""
    rates = rates or {}
    total = 0.0
    for i in range(config.num_hidden_layers):
        r = rates.get(i, 1.0)
        n = seq * r
        if i in keep:
            total += n * (token_flops(config) - kv_token_flops(config)) + seq * kv_token_flops(config) \
                + attn_pair_flops(config) * r * seq * (seq + 1) / 2
        else:
            total += n * token_flops(config) + attn_pair_flops(config) * n * (n + 1) / 2
    d, *_, V = _dims(config)
    return total + 2 * d * V * logits


def decode_flops(config, context: int, rates: dict[int, float] | None = None,
                 keep: frozenset[int] = frozenset()) -> float:
    """Expected FLOPs of one decode token after `context` tokens: a routed layer runs with probability
    r and then attends to the r * context keys it cached (every key, and its K/V always computed, in `keep`)."""
    rates = rates or {}
    total = 0.0
    for i in range(config.num_hidden_layers):
        r = rates.get(i, 1.0)
        if i in keep:
            total += kv_token_flops(config) + r * (token_flops(config) - kv_token_flops(config)
                                                   + attn_pair_flops(config) * (context + 1))
        else:
            total += r * (token_flops(config) + attn_pair_flops(config) * (r * context + 1))
    d, *_, V = _dims(config)
    return total + 2 * d * V


def kv_ratio(config, rates: dict[int, float], keep: frozenset[int] = frozenset()) -> float:
    """KV bytes of the MoD model / dense: 1 - rho * (1 - r) for equal rates; a layer in `keep` stores every token."""
    n = config.num_hidden_layers
    return sum(1.0 if i in keep else rates.get(i, 1.0) for i in range(n)) / n


def keep_layers(model) -> frozenset[int]:
    """The routed layers of a MoD model that store every token's K/V (skipped_kv 'keep', not off)."""
    cfg = getattr(model, "mod_config", None)
    if cfg is None or cfg.skipped_kv != "keep":
        return frozenset()
    return frozenset(j for j in model.routed_layers if not cfg.is_off(j))
