#!/usr/bin/env python
"""Export a training checkpoint as a HF model directory (with tokenizer).

    python launch/export.py runs/smol runs/smol-hf                 # newest good checkpoint
    python launch/export.py runs/smol/checkpoints/step_000400 out/ --dtype float32
Then: `import mod_train; AutoModelForCausalLM.from_pretrained("runs/smol-hf")`.
ZeRO 1/2/3 checkpoints are gathered offline (no GPU, no launcher); TP checkpoints use the
consolidated 16-bit weights saved alongside them.
"""
from dataclasses import dataclass
from typing import Literal, Optional

from mod_train import cli


@dataclass
class ExportConfig:
    checkpoint: str
    """A run directory, its checkpoints/ directory, or one step_XXXXXX directory."""
    dest: str
    """Output HF directory."""
    dtype: Optional[Literal["bfloat16", "float32"]] = None
    """Weights' dtype in the export (None: as trained)."""


def main(argv):
    cfg = cli.parse(ExportConfig, argv, prog="export.py", description=__doc__, positional=("checkpoint", "dest"))
    from mod_train.train.export import export
    print(export(cfg.checkpoint, cfg.dest, dtype=cfg.dtype))
    return 0


if __name__ == "__main__":
    cli.main(main, "export.py")
