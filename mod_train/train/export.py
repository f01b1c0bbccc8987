"""Checkpoint -> HF directory (config, safetensors, tokenizer) that `AutoModelForCausalLM.from_pretrained`
loads after `import mod_train`. A LoRA run's adapters are merged into the base weights: the directory holds a plain
MoD model, as after a full run. Needs only the checkpoint: the dense model's config and the run's
tokenizer (the one that tokenised the data) are saved in its `hf/` folder.

Weights come from, in order of preference: the consolidated 16-bit state written at save time when
tensor parallelism is on (zero_to_fp32 cannot read TP x ZeRO-3 checkpoints); per-layer pipeline
files; DeepSpeed's zero_to_fp32 (ZeRO 1/2/3 gathered offline, no GPU, no distributed world); the
plain module state of a ZeRO-0 checkpoint.
"""
from __future__ import annotations

import glob
from pathlib import Path

import torch

from mod_train.paths import MissingPathError
from mod_train.train import checkpoint as ckpt
from mod_train.train import lora


def resolve(path) -> tuple[Path, str]:
    """(checkpoints root, tag) for an output dir, a checkpoints dir, or one checkpoint dir."""
    p = Path(path)
    if not p.is_dir():
        raise MissingPathError(f"checkpoint = {str(path)!r}: the folder does not exist (resolved: {p.resolve()}); "
                               "give a run directory, its checkpoints/ folder or one step_NNNNNN folder")
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    if ckpt.TAG_RE.match(p.name) and (p / "meta.json").is_file():
        why = ckpt.check_complete(p)
        if why:
            raise RuntimeError(f"checkpoint {p} is incomplete: {why}")
        return p.parent, p.name
    tag = ckpt.find_resume(p)
    if tag is None:
        raise FileNotFoundError(f"no checkpoint under {path}")
    return p, tag


def load_state_dict(root: Path, tag: str, meta: dict) -> dict:
    d = root / tag
    if (d / "consolidated_16bit.pt").is_file():
        return torch.load(d / "consolidated_16bit.pt", map_location="cpu", weights_only=False)
    if glob.glob(str(d / "layer_*-model_states.pt")):
        from mod_train.parallel.pipeline import state_dict_from_pipeline_checkpoint
        return state_dict_from_pipeline_checkpoint(d)
    if meta["fingerprint"]["zero_stage"] == 0:
        st = torch.load(d / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return st["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return _with_frozen(d, get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag))


def _with_frozen(d: Path, sd: dict) -> dict:
    """`sd` completed by the parameters that did not train (trainable routers/lora): under ZeRO-1 DeepSpeed
    saves no fragments of frozen parameters, so zero_to_fp32 leaves them out; they are whole in the module state
    of rank 0 (as the model held them). Under ZeRO-2/3 zero_to_fp32 has them already and nothing is added."""
    if not (d / "mp_rank_00_model_states.pt").is_file():  # ZeRO-3 names its module states per rank
        return sd
    st = torch.load(d / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    frozen = {k: v for k, v in st["module"].items() if k not in sd and v.numel() > 0}
    return {**frozen, **sd}


def export(path, dest, dtype: str | None = None, tag: str | None = None) -> Path:
    """Write checkpoint `path` (run dir, checkpoints dir or one checkpoint) as a HF directory `dest`.
    dtype: 'bfloat16'/'float32'/None (None: bf16 if the run trained in bf16, else fp32)."""
    import mod_train  # noqa: F401  (registers the MoD Auto classes)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from mod_train import MoDConfig
    from mod_train.mod.convert import mod_hf_config

    root, found = resolve(path)
    tag = tag or found
    meta = ckpt.load_meta(root / tag)
    sd = load_state_dict(root, tag, meta)
    hf_dir = root / tag / "hf"  # checkpoints before it existed: the original model folder
    config = AutoConfig.from_pretrained(hf_dir if (hf_dir / "config.json").is_file() else meta["model_path"])
    if not meta.get("dense") and meta.get("mod") is not None:
        config = mod_hf_config(config, MoDConfig.from_dict(meta["mod"]))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        if meta["train"].get("trainable") == "lora":  # the adapters as trained, merged below
            lora.apply(model, lora.recorded(meta["train"]))
    model = model.to_empty(device="cpu")
    res = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    if isinstance(getattr(model, "_tied_weights_keys", None), dict):
        tied = set(model._tied_weights_keys)
    missing = [k for k in res.missing_keys if k not in tied and not k.endswith("rotary_emb.inv_freq")]
    if missing or res.unexpected_keys:
        raise RuntimeError(f"checkpoint {root / tag} does not match the model: missing {missing[:8]}, "
                           f"unexpected {res.unexpected_keys[:8]}")
    model.tie_weights()
    lora.merge(model)
    # non-persistent buffers (RoPE inv_freq) are not saved; from_pretrained recomputes them
    if dtype is None:
        dtype = "bfloat16" if meta["train"]["precision"] == "bf16" else "float32"
    model = model.to(getattr(torch, dtype))
    dest = Path(dest)
    model.save_pretrained(dest)
    if (hf_dir / "tokenizer_config.json").is_file():
        AutoTokenizer.from_pretrained(hf_dir).save_pretrained(dest)
    elif meta.get("tokenizer") is None:
        print("[mod_train] warning: the run had no tokenizer (synthetic data); none saved with the export")
    else:  # a checkpoint written before hf/ existed: the tokenizer is wherever the run read it
        try:
            AutoTokenizer.from_pretrained(meta["tokenizer"]).save_pretrained(dest)
        except Exception as e:  # noqa: BLE001
            print(f"[mod_train] warning: no tokenizer saved ({e})")
    (dest / "mod_train_export.json").write_text(
        __import__("json").dumps({"checkpoint": str(root / tag), "step": meta["step"]}, indent=1))
    return dest
