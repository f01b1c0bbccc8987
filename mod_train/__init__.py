"""mod_train: MoDification (threshold-p Mixture-of-Depths) for HF causal LMs, trained on DeepSpeed."""
from mod_train.config import MoDConfig, MoDConfigError

__version__ = "0.1.0"
__all__ = ["MoDConfig", "MoDConfigError", "__version__"]
