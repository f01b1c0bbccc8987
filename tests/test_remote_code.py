"""Exported MoD directories load anywhere: `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` in a
fresh process that never imported mod_train gives the same logits as the in-process model; without the package the
error is one line naming it; after `import mod_train` the plain load (no trust_remote_code) keeps working."""
import json
import subprocess
import sys
import textwrap

import torch

from conftest import randomize_routers, tiny_model

FRESH = textwrap.dedent("""
    import sys, torch
    from transformers import AutoModelForCausalLM

    class NoModTrain:  # first: the package is missing -> one clear line
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "mod_train":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, NoModTrain())
    try:
        AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
        missing = "loaded without mod_train?"
    except ImportError as e:
        missing = str(e)
    sys.meta_path.pop(0)
    imported_before = "mod_train" in sys.modules
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    ids = torch.load(sys.argv[2])
    with torch.no_grad():
        torch.save(model(input_ids=ids).logits, sys.argv[3])
    print(repr(missing))
    print(imported_before, type(model).__name__)
""")


def test_saved_mod_model_loads_with_remote_code_in_fresh_process(tmp_path):
    from transformers import AutoModelForCausalLM

    from mod_train import MoDConfig, modify
    model = randomize_routers(modify(tiny_model(layers=4, seed=3), MoDConfig(layers="odd")), std=2.0).eval()
    d = tmp_path / "mod"
    model.save_pretrained(d)
    auto_map = json.loads((d / "config.json").read_text())["auto_map"]
    assert auto_map == {"AutoConfig": "modeling_mod.MoDLlamaConfig",
                        "AutoModelForCausalLM": "modeling_mod.MoDLlamaForCausalLM"}
    ids = torch.randint(1, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    r = subprocess.run([sys.executable, "-c", FRESH, str(d), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    missing, loaded = r.stdout.strip().splitlines()[-2:]
    assert "needs the mod_train package" in missing and "pip install -e" in missing and "\\n" not in missing
    assert loaded == "False MoDLlamaForCausalLM"  # mod_train was not imported before from_pretrained
    assert torch.equal(torch.load(tmp_path / "out.pt"), ref)
    # the plain path after `import mod_train` (no trust_remote_code) is unchanged and gives the same logits
    again = AutoModelForCausalLM.from_pretrained(d).eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, ref)
