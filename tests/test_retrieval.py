"""Passkey / key-value needle retrieval: probes are deterministic for a seed and exactly as long as asked, the needle
sits at its depth with its spans right, scoring is right on hand-made logits, the MoD model's rates at the needle
are recorded, and a length beyond the model's window is one line."""
import pytest
import torch

from conftest import randomize_routers, tiny_model
from harness import make_tiny_model_with_tokenizer
from test_eval import _docs


@pytest.fixture(scope="module")
def tok_and_hay(tmp_path_factory):
    from transformers import AutoTokenizer

    from mod_train.eval.retrieval import haystack_ids
    from mod_train.eval import retrieval as R
    docs = _docs(4, 300, 400, 1)
    prompts = list(R._INTRO.values()) + [R._question("passkey", ""), R._question("kv", "quiet-river"),
                                         "The pass key is 0123456789. Remember it. " + " ".join(R._ADJ + R._NOUN)]
    d = make_tiny_model_with_tokenizer(tmp_path_factory.mktemp("ret") / "m", docs + prompts * 20)
    tok = AutoTokenizer.from_pretrained(d)
    return tok, haystack_ids(tok, [(f"d{k}", "s", t) for k, t in enumerate(docs)])


@pytest.mark.parametrize("task", ["passkey", "kv"])
def test_probe_deterministic_exact_length_and_spans(tok_and_hay, task):
    from mod_train.eval.retrieval import make_probe
    tok, hay = tok_and_hay
    p = make_probe(task, tok, hay, 400, 0.5, trial=0, seed=7)
    assert p == make_probe(task, tok, hay, 400, 0.5, trial=0, seed=7)
    assert p.prompt != make_probe(task, tok, hay, 400, 0.5, trial=1, seed=7).prompt
    assert len(p.prompt) + len(p.answer) == 400
    assert p.prompt[p.value[0]:p.value[1]] == p.answer  # the answer copies the needle's value tokens
    needle = tok.decode(p.prompt[p.needle[0]:p.needle[1]])
    value = tok.decode(p.answer).strip()
    assert value.isdigit() and value in needle
    assert ("The pass key is" if task == "passkey" else "The special magic number for") in needle
    if task == "kv":  # the question names the target key; distractor needles carry other keys
        key = needle.split("for ")[1].split(" is")[0]
        assert f"number for {key}?" in tok.decode(p.prompt[-40:])
        assert tok.decode(p.prompt).count("The special magic number for") == 1 + 3 + 1
    early, late = (make_probe(task, tok, hay, 400, d, 0, 7) for d in (0.0, 1.0))
    assert early.needle[0] < p.needle[0] < late.needle[0] if task == "passkey" else early.needle[0] < late.needle[0]


def test_score_on_hand_made_logits():
    from mod_train.eval.retrieval import score
    logits = torch.full((3, 10), -5.0)
    logits[0, 4] = logits[1, 2] = logits[2, 7] = 5.0
    lp = torch.log_softmax(logits.double(), -1)
    ok, logprob = score(logits, [4, 2, 7])
    assert ok and logprob == pytest.approx(float(lp[0, 4] + lp[1, 2] + lp[2, 7]))
    ok, logprob = score(logits, [4, 3, 7])  # one wrong digit: no exact match
    assert not ok and logprob == pytest.approx(float(lp[0, 4] + lp[1, 3] + lp[2, 7]))


def test_run_probe_dense_and_mod_rates(tok_and_hay):
    from mod_train import MoDConfig, modify
    from mod_train.eval.retrieval import evaluate, make_probe, run_probe
    tok, hay = tok_and_hay
    dense = tiny_model(layers=4, seed=2, vocab_size=len(tok), max_position_embeddings=512)
    p = make_probe("passkey", tok, hay, 300, 0.5, 0)
    assert set(run_probe(dense, p)) == {"correct", "logprob"}
    mod = randomize_routers(modify(tiny_model(layers=4, seed=2, vocab_size=len(tok), max_position_embeddings=512),
                                   MoDConfig(layers="odd")), std=2.0).eval()
    r = run_probe(mod, p)
    assert 0 < r["rate"] < 1 and 0 <= r["needle_rate"] <= 1 and 0 <= r["value_rate"] <= 1
    with torch.no_grad():  # the needle rate is the routed layers' selection at the needle's positions
        _, terms = mod.mod_stack(*mod.mod_embed(p.ids))
    sel = torch.stack([t.selected[0, p.needle[0]:p.needle[1]] for t in terms]).float()
    assert r["needle_rate"] == pytest.approx(float(sel.mean()))
    res = evaluate({"dense": dense, "mod": mod}, tok, hay, ["passkey", "kv"], [400, 500], [0.0, 1.0], trials=2)
    assert res["kv"]["mod"]["500"]["1.0"]["trials"] == 2 and "needle_rate" in res["kv"]["mod"]["500"]["1.0"]


def test_length_beyond_window_is_one_line():
    from mod_train.config import ConfigError
    from mod_train.eval.retrieval import check_lengths
    model = tiny_model(max_position_embeddings=256)
    check_lengths([128, 256], model)
    with pytest.raises(ConfigError, match=r"retrieval_lengths=\[128, 1024\]: \[1024\] exceed .*max_position_embeddings "
                                          r"256\); use lengths <= 256") as e:
        check_lengths([128, 1024], model)
    assert "\n" not in str(e.value)
