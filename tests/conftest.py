"""Shared fixtures: tiny HF configs for unit tests and the real SmolLM2-135M (converted once per machine
and cached under $MOD_TRAIN_HOME, see mod_train/offline.py)."""
from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch


def tiny_config(arch: str = "llama", layers: int = 4, **kw):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[arch]
    base = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)
    if arch in ("qwen2", "qwen3"):
        base["head_dim"] = 8
    if arch == "mistral":
        base["sliding_window"] = None
    base.update(kw)
    return cls(**base)


def tiny_model(arch: str = "llama", layers: int = 4, seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    cfg = tiny_config(arch, layers, **kw)
    cfg._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(cfg).eval()


def randomize_routers(model, std: float = 1.0, bias: float = 0.0, seed: int = 0):
    """Token-dependent gates so that roughly half the tokens run (tests need both kinds): the library's
    mod_train.random_routers, under no_grad."""
    from mod_train import random_routers
    with torch.no_grad():
        return random_routers(model, seed=seed, std=std, bias=bias)


@pytest.fixture(scope="session")
def smollm2_dir():
    from mod_train.offline import smollm2_path
    return smollm2_path()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def real_text_ids(smollm2_tokenizer):
    """Real held-out text: a CPython stdlib module and a public-domain text shipped with CPython docs."""
    import pathlib
    import sysconfig
    text = pathlib.Path(sysconfig.get_paths()["stdlib"], "argparse.py").read_text()
    return smollm2_tokenizer(text, return_tensors="pt").input_ids
