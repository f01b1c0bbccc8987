"""mod_train: MoDification (threshold-p Mixture-of-Depths) for HF causal LMs, trained on DeepSpeed.

    import mod_train
    from mod_train import MoDConfig, modify
    model = modify(AutoModelForCausalLM.from_pretrained(path), MoDConfig(routing="threshold", threshold=0.5))
    out = model(input_ids=ids, attention_mask=mask, labels=ids)   # out.loss, out.aux_loss, out.routing
    model.save_pretrained(d); AutoModelForCausalLM.from_pretrained(d)   # the same MoD model
"""
from mod_train.config import MoDConfig, MoDConfigError
from mod_train.mod.cache import MoDCache, kv_cache_bytes
from mod_train.mod.calibrate import calibrate_thresholds, fit_routers_to_importance, random_routers
from mod_train.mod.convert import (SUPPORTED, UnsupportedModelError, from_pretrained_mod, init_routers, modify,
                                   register_auto_classes)
from mod_train.mod.model import MoDCausalLMOutput, MoDMixin

register_auto_classes()

__version__ = "0.1.0"
__all__ = ["MoDConfig", "MoDConfigError", "modify", "from_pretrained_mod", "init_routers", "calibrate_thresholds",
           "fit_routers_to_importance", "random_routers", "MoDCache", "kv_cache_bytes", "MoDMixin",
           "MoDCausalLMOutput", "UnsupportedModelError", "SUPPORTED", "__version__"]
