"""The modeling file that every saved MoD directory carries (as `modeling_mod.py`, named by config.json's
`auto_map`), so `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` works in a process that
never imported mod_train: lm-evaluation-harness, vLLM-style loaders, any HF tool.

It holds no model code of its own: it re-exports the classes of the installed mod_train package, so the
remote-code load and `import mod_train; from_pretrained(dir)` build the same class and give the same logits.
The import sits in a try block: transformers' own import check skips it, and a missing package gets one line
that says how to install it instead of transformers' generic `pip install mod_train` hint.
"""
try:
    from mod_train.mod.convert import (MoDLlamaConfig, MoDLlamaForCausalLM, MoDMistralConfig,  # noqa: F401
                                       MoDMistralForCausalLM, MoDQwen2Config, MoDQwen2ForCausalLM, MoDQwen3Config,
                                       MoDQwen3ForCausalLM)
except ModuleNotFoundError as e:
    if not (e.name or "").startswith("mod_train"):
        raise
    raise ImportError("this Mixture-of-Depths model directory needs the mod_train package, which defines its "
                      "routed layers: install it with `pip install -e <path to the mod_train repository>` "
                      "(it pins torch and transformers), then load again") from None
