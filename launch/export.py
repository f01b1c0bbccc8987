#!/usr/bin/env python
"""Export a training checkpoint as a HF model directory (with tokenizer).

    python launch/export.py runs/smol runs/smol-hf                 # newest good checkpoint
    python launch/export.py runs/smol/checkpoints/step_000400 out/ --dtype float32
Then: `import mod_train; AutoModelForCausalLM.from_pretrained("runs/smol-hf")`.
ZeRO 1/2/3 checkpoints are gathered offline (no GPU, no launcher); TP checkpoints use the
consolidated 16-bit weights saved alongside them.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="run dir, its checkpoints/ dir, or one step_XXXXXX dir")
    ap.add_argument("dest", help="output HF directory")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default=None)
    a = ap.parse_args(argv)
    from mod_train.train.export import export
    print(export(a.checkpoint, a.dest, dtype=a.dtype))


if __name__ == "__main__":
    main()
