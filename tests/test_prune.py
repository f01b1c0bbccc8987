"""Static depth pruning (the matched-compute baseline): block influence, choosing the layers, and deleting them
equals skipping them; the pruned model saves and reloads as a plain HF model."""
import copy

import pytest
import torch
from conftest import tiny_model

from mod_train.mod.prune import block_influence, lowest_influence, matched_layers, prune_layers


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_pruning_equals_skipping_the_layers(arch, tmp_path):
    from transformers import AutoModelForCausalLM
    m = tiny_model(arch, layers=5).eval()
    ids = torch.randint(0, m.config.vocab_size, (2, 12))
    drop = [1, 3]
    handles = [m.model.layers[i].register_forward_hook(
        lambda mod, args, kwargs, out: (kwargs.get("hidden_states", args[0] if args else None),) + tuple(out[1:])
        if isinstance(out, tuple) else kwargs.get("hidden_states", args[0] if args else None), with_kwargs=True)
        for i in drop]
    with torch.no_grad():
        skipped = m(ids).logits
    for h in handles:
        h.remove()
    p = prune_layers(copy.deepcopy(m), drop)
    assert p.config.num_hidden_layers == 3 and len(p.model.layers) == 3
    with torch.no_grad():
        torch.testing.assert_close(p(ids).logits, skipped)
        full = p.generate(ids[:1, :6], max_new_tokens=4, do_sample=False)  # the KV cache indexes 3 layers
        step = ids[:1, :6]
        for _ in range(4):
            step = torch.cat([step, p(step).logits[:, -1:].argmax(-1)], 1)
        assert torch.equal(full, step)
    p.save_pretrained(tmp_path)
    r = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(r(ids).logits, skipped)


def test_block_influence_and_choice():
    m = tiny_model("llama", layers=4).eval()
    ids = torch.randint(0, m.config.vocab_size, (2, 10))
    bi = block_influence(m, [{"input_ids": ids}])
    h = m(ids, output_hidden_states=True).hidden_states
    cos = torch.nn.functional.cosine_similarity(h[1].double(), h[2].double(), dim=-1)
    assert bi[1] == pytest.approx(1 - cos.mean().item(), rel=1e-9)
    assert set(bi) == {0, 1, 2, 3} and all(0 <= v <= 2 for v in bi.values())
    order = sorted(range(1, 3), key=lambda i: bi[i])
    assert lowest_influence(bi, 1, keep_first=1, keep_last=1) == [order[0]]
    with pytest.raises(ValueError, match="deletable"):
        lowest_influence(bi, 3, keep_first=1, keep_last=1)
    assert matched_layers(13, 0.44) == 7
