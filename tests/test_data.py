"""Data pipeline tests: shares, document boundaries, exact resume, rank sharding, determinism, bad inputs.

Tiny jsonl/text/parquet fixtures in tmp_path and the real offline SmolLM2 tokenizer.
"""
import json
import random
import warnings

import numpy as np
import pytest
import torch

from mod_train.data import (IGNORE_INDEX, TENSOR_KEYS, DataError, PackedStream, collate, heldout_documents,
                            load_recipe, load_tokenizer)
from mod_train.data.stream import is_heldout

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which "
         "river stone cloud apple window market silver garden thunder lantern").split()


@pytest.fixture(scope="session")
def tok():
    return load_tokenizer("smollm2")


def _text(rng, n_words):
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def write_jsonl(path, n_docs, lo, hi, seed=0, prefix="d"):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n_docs):
            f.write(json.dumps({"text": f"{prefix}{i} " + _text(rng, rng.randint(lo, hi)), "title": f"{prefix}{i}"}) + "\n")
    return str(path)


def recipe(tmp_path, sources=None, **kw):
    if sources is None:
        sources = [
            {"name": "short", "path": write_jsonl(tmp_path / "short.jsonl", 120, 20, 120, seed=1, prefix="s"), "weight": 0.2},
            {"name": "mid", "path": write_jsonl(tmp_path / "mid.jsonl", 60, 100, 400, seed=2, prefix="m"), "weight": 0.3},
            {"name": "long", "path": write_jsonl(tmp_path / "long.jsonl", 25, 500, 1500, seed=3, prefix="l"), "weight": 0.5},
        ]
    raw = {"name": "t", "sources": sources, "stages": [{"seq_len": 256, "tokens": None}], "seed": 5,
           "eos_token": "<|endoftext|>", "tokenize_batch": 8}
    raw.update(kw)
    return load_recipe(raw)


def take(stream, n):
    out = []
    if n == 0:
        return out
    for row in stream:
        out.append(row)
        if len(out) == n:
            break
    return out


def rows_equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in TENSOR_KEYS) and a["sources"] == b["sources"] and a["docs"] == b["docs"]


# -- shares ---------------------------------------------------------------------------------------------
def test_realised_token_shares_match_requested(tmp_path, tok):
    r = recipe(tmp_path)
    rows = take(PackedStream(r, tok), 400)
    counts = np.bincount(torch.stack([x["source_ids"] for x in rows]).flatten().numpy(), minlength=3)
    shares = counts / counts.sum()
    assert np.allclose(shares, [0.2, 0.3, 0.5], atol=0.02), shares


def per_row_source_tokens(rows, n_sources):
    return np.stack([np.bincount(x["source_ids"].numpy(), minlength=n_sources) for x in rows])


def test_any_window_of_rows_holds_the_shares(tmp_path, tok):
    # the stated tolerance (docs/data.md): with k sources, any W consecutive rows hold each source's
    # token share to within (k-1)/W, because a row piece is at most one row long
    r = recipe(tmp_path)
    counts = per_row_source_tokens(take(PackedStream(r, tok), 200), 3)
    weights = np.array(r.normalised_weights())
    for w in (1, 3, 10, 40, 200):
        for a in range(0, len(counts) - w + 1):
            window = counts[a:a + w].sum(0)
            assert np.abs(window / window.sum() - weights).max() <= 2 / w + 1e-12, (w, a, window)


def test_open_documents_interleave_and_continue_where_they_left_off(tmp_path, tok):
    r = recipe(tmp_path, open_docs=4)
    rows = take(PackedStream(r, tok), 24)
    pieces = [(n, e, p, o, int((x["doc_ids"] == j).sum()))
              for x in rows for j, (n, e, p, o) in enumerate(x["docs"])]
    long_docs = [(e, p) for n, e, p, o, _ in pieces if n == "long"]
    assert len(set(long_docs[:4])) == 4  # the first four 'long' pieces come from four open documents
    packed = {}
    for n, e, p, o, length in pieces:  # each document's pieces follow on, in stream order
        assert o == packed.get((n, e, p), 0), (n, e, p, o)
        packed[(n, e, p)] = o + length
    assert any(long_docs[k] != long_docs[k + 1] and long_docs[k] in long_docs[k + 2:] for k in range(len(long_docs) - 2))


def test_open_docs_1_packs_whole_documents_one_after_another(tmp_path, tok):
    # the stream before interleaving (kept for recipes that opt out): no document is interrupted
    r = recipe(tmp_path, open_docs=1)
    runs = [(n, e, p) for x in take(PackedStream(r, tok), 60) for (n, e, p, _o) in x["docs"]]
    collapsed = [d for k, d in enumerate(runs) if k == 0 or d != runs[k - 1]]
    assert len(collapsed) == len(set(collapsed))
    with pytest.raises(DataError, match=r"open_docs must be an integer >= 1.*got 0"):
        recipe(tmp_path, open_docs=0)


def test_weights_not_summing_to_one_are_normalised_with_notice(tmp_path):
    with pytest.warns(UserWarning, match="normalised"):
        r = recipe(tmp_path, sources=[
            {"name": "a", "path": write_jsonl(tmp_path / "a.jsonl", 5, 10, 20), "weight": 2},
            {"name": "b", "path": write_jsonl(tmp_path / "b.jsonl", 5, 10, 20), "weight": 6}])
    assert r.normalised_weights() == [0.25, 0.75]


# -- boundaries -----------------------------------------------------------------------------------------
def test_rows_mark_every_document_boundary(tmp_path, tok):
    r = recipe(tmp_path)
    stream = PackedStream(r, tok)
    rows = take(stream, 60)
    # raw documents by (source, title) to check every packed piece against a direct tokenisation
    docs = {}
    for s in r.sources:
        for line in open(s.path):
            rec = json.loads(line)
            docs[(s.name, rec["title"])] = tok(rec["text"], add_special_tokens=False)["input_ids"] + [0]
    n_pieces = 0
    titles = pos_titles(r)
    for row in rows:
        ids, pos, did, lab, sid = (row[k] for k in TENSOR_KEYS)
        assert ids.shape == (256,) and ids.dtype == torch.long
        starts = torch.nonzero(torch.diff(did, prepend=torch.tensor([-1]))).flatten().tolist()
        assert did[0] == 0 and (torch.diff(did) >= 0).all() and (torch.diff(did) <= 1).all()
        assert len(starts) == len(row["docs"])
        bounds = starts + [256]
        for j, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            assert torch.equal(pos[a:b], torch.arange(b - a)), "position ids must restart per document"
            assert lab[a] == IGNORE_INDEX, "first token of a document must not be predicted"
            assert torch.equal(lab[a + 1:b], ids[a + 1:b])
            assert (sid[a:b] == sid[a]).all()
            name, _epoch, p, off = row["docs"][j]
            assert stream.source_names[sid[a]] == name
            # the piece is exactly the document's tokens at that offset (no mixing across documents)
            assert ids[a:b].tolist() == docs[(name, titles[(name, _epoch, p)])][off:off + b - a]
            n_pieces += 1
        # attention allowed by doc_ids never crosses a document
        same = did[:, None] == did[None, :]
        causal = torch.tril(torch.ones(256, 256, dtype=torch.bool))
        allowed = same & causal
        for a, b in zip(bounds[:-1], bounds[1:]):
            assert not allowed[a:b, :a].any()
    assert n_pieces > len(rows)  # rows do hold several documents


def pos_titles(r, epochs=(0, 1, 2), salt=0):
    """(source, epoch, position) -> title, from the raw sources."""
    from mod_train.data.sources import RawSource, parse
    out = {}
    for i, s in enumerate(r.sources):
        raw = RawSource(r, i, salt=salt)
        for e in epochs:
            for p, entry in raw.iter_epoch(e, 0):
                out[(s.name, e, p)] = parse(entry, s)[0]
    return out


def test_collate_batches_rows(tmp_path, tok):
    rows = take(PackedStream(recipe(tmp_path), tok), 3)
    b = collate(rows)
    assert all(b[k].shape == (3, 256) and b[k].dtype == torch.long for k in TENSOR_KEYS)
    assert len(b["sources"]) == 3 and torch.equal(b["input_ids"][2], rows[2]["input_ids"])


# -- resume ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 9, 37])
def test_resume_after_n_rows_equals_uninterrupted(tmp_path, tok, n):
    # small sources so the stream crosses epochs; short-document keep-probability active
    sources = [
        {"name": "a", "path": write_jsonl(tmp_path / "a.jsonl", 30, 20, 150, seed=1), "weight": 0.5,
         "short_doc_tokens": 100, "short_keep_prob": 0.5, "shuffle_block": 7},
        {"name": "b", "path": write_jsonl(tmp_path / "b.jsonl", 6, 300, 900, seed=2), "weight": 0.5},
    ]
    r = recipe(tmp_path, sources=sources)
    full = take(PackedStream(r, tok), n + 40)
    s1 = PackedStream(r, tok)
    take(s1, n)
    state = json.loads(json.dumps(s1.state_dict()))  # must survive a JSON round trip
    s2 = PackedStream(r, tok)
    s2.load_state_dict(state)
    rest = take(s2, 40)
    assert len(rest) == 40
    assert all(rows_equal(a, b) for a, b in zip(full[n:], rest))
    assert max(x["docs"][-1][1] for x in full) >= 1  # crossed an epoch boundary


def test_resume_with_several_open_documents_is_exact_and_small(tmp_path, tok):
    r = recipe(tmp_path, open_docs=3)
    full = take(PackedStream(r, tok), 50)
    s1 = PackedStream(r, tok)
    take(s1, 17)
    state = json.loads(json.dumps(s1.state_dict()))
    opened = [d for docs in state["open"] for d in docs]
    assert len(opened) >= 6 and any(offset > 0 for _e, _p, offset, _n, _crc in opened)
    assert len(json.dumps(state)) < 2000  # positions and offsets, not token ids
    s2 = PackedStream(r, tok)
    s2.load_state_dict(state)
    assert all(rows_equal(a, b) for a, b in zip(full[17:], take(s2, 33)))
    # an open document that reads back differently (the files changed) is an error, not a silent drift
    path = r.sources[2].path
    lines = open(path).read().splitlines()
    open(path, "w").write("\n".join(line.replace(" river ", " lake ") for line in lines) + "\n")
    with pytest.raises(DataError, match="source 'long'.*reads back differently"):
        PackedStream(r, tok).load_state_dict(state)


def test_resume_rejects_other_layout(tmp_path, tok):
    r = recipe(tmp_path)
    s = PackedStream(r, tok, dp_rank=0, dp_world_size=2)
    take(s, 2)
    with pytest.raises(DataError, match="different"):
        PackedStream(r, tok, dp_rank=1, dp_world_size=2).load_state_dict(s.state_dict())


def test_token_budget_splits_over_ranks(tmp_path, tok):
    r = recipe(tmp_path, stages=[{"seq_len": 128, "tokens": 128 * 10}])
    assert len(list(PackedStream(r, tok, dp_rank=0, dp_world_size=2))) == 5


# -- rank sharding ---------------------------------------------------------------------------------------
def test_rank_shards_are_disjoint_and_complete(tmp_path, tok):
    sources = [
        {"name": "a", "path": write_jsonl(tmp_path / "a.jsonl", 40, 20, 200, seed=1), "weight": 0.4, "repeat": False},
        {"name": "b", "path": write_jsonl(tmp_path / "b.jsonl", 13, 200, 700, seed=2), "weight": 0.6, "repeat": False},
    ]
    r = recipe(tmp_path, sources=sources)

    def docs_of(rank, world):
        s = PackedStream(r, tok, dp_rank=rank, dp_world_size=world, drop_last=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows = list(s)
        return rows, {(n, e, p) for row in rows for (n, e, p, _o) in row["docs"]}

    _, everything = docs_of(0, 1)
    assert len(everything) == 53  # every document once
    parts = [docs_of(k, 3) for k in range(3)]
    sets = [d for _, d in parts]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not sets[i] & sets[j]
    assert set().union(*sets) == everything
    assert not torch.equal(parts[0][0][0]["input_ids"], parts[1][0][0]["input_ids"])
    # tensor-parallel peers (same dp_rank) see identical rows
    again = PackedStream(r, tok, dp_rank=1, dp_world_size=3, drop_last=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert all(rows_equal(a, b) for a, b in zip(parts[1][0], again))


# -- elastic re-sharding ---------------------------------------------------------------------------------
def coverage(rows) -> dict:
    """{(source, epoch, position): sorted [(token offset, tokens)]} of every document segment in `rows`."""
    cov = {}
    for row in rows:
        real = row["source_ids"] >= 0
        for d, (name, e, p, offset) in enumerate(row["docs"]):
            cov.setdefault((name, e, p), []).append((offset, int(((row["doc_ids"] == d) & real).sum())))
    return {k: sorted(v) for k, v in cov.items()}


def assert_each_token_once(cov, reference):
    """Every document of `reference` covered from its first to its last token, no token twice, nothing else."""
    assert cov.keys() == reference.keys()
    for doc, pieces in cov.items():
        end = 0
        for offset, n in pieces:
            assert offset == end, (doc, pieces)  # a gap is a skipped token, an overlap a token trained twice
            end += n
        assert end == sum(n for _o, n in reference[doc]), doc


def drain(streams):
    """Rows of every stream to its end (the sources' last pass), warnings about exhausted sources muted."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [row for s in streams for row in s]


@pytest.mark.parametrize("layouts", [(2, 1), (1, 2), (2, 3), (3, 2, 4)], ids=["2-1", "1-2", "2-3", "3-2-4"])
def test_resharded_streams_train_every_token_once(tmp_path, tok, layouts):
    """A run that changes its data-parallel size (2 -> 1, 1 -> 2, 2 -> 3, 3 -> 2 -> 4) takes ranks' shares of
    what the old ranks had not consumed: over the whole run every token of every document is in exactly one
    row, as in an uninterrupted run (several open documents cut mid-way, one source read twice)."""
    sources = [
        {"name": "a", "path": write_jsonl(tmp_path / "a.jsonl", 40, 20, 200, seed=1), "weight": 0.4, "repeat": 2,
         "shuffle_block": 5},
        {"name": "b", "path": write_jsonl(tmp_path / "b.jsonl", 13, 200, 700, seed=2), "weight": 0.6, "repeat": False},
    ]
    r = recipe(tmp_path, sources=sources, open_docs=3)
    reference = coverage(drain([PackedStream(r, tok, drop_last=False)]))
    rows, states = [], None
    for k, world in enumerate(layouts):
        streams = [PackedStream(r, tok, dp_rank=i, dp_world_size=world, drop_last=False) for i in range(world)]
        if states is not None:
            for s in streams:
                s.load_resharded(json.loads(json.dumps(states)))
        if k + 1 < len(layouts):
            for s in streams:
                rows += take(s, 6)
            states = [s.state_dict() for s in streams]
        else:
            rows += drain(streams)
    assert_each_token_once(coverage(rows), reference)
    assert {e for (_n, e, _p) in reference} == {0, 1}


def test_synthetic_rows_reshard_to_the_next_global_rows():
    """Synthetic rows are global rows i % world == rank: after k rows per rank on 2 ranks, 3 ranks continue with
    rows 2k, 2k+1, ... (none twice, none skipped)."""
    from mod_train.data import SyntheticStream

    def ids(s, n):  # the global index of each row taken
        out = []
        for _ in range(n):
            out.append(s.index)
            next(s)
        return out
    old = [SyntheticStream(8, 50, dp_rank=r, dp_world_size=2) for r in range(2)]
    seen = [i for s in old for i in ids(s, 3)]
    new = [SyntheticStream(8, 50, dp_rank=r, dp_world_size=3) for r in range(3)]
    for s in new:
        s.load_resharded([o.state_dict() for o in old])
    seen += [i for s in new for i in ids(s, 2)]
    assert sorted(seen) == list(range(12))


def test_resharding_needs_every_old_rank_of_one_layout(tmp_path, tok):
    r = recipe(tmp_path)
    old = [PackedStream(r, tok, dp_rank=i, dp_world_size=2) for i in range(2)]
    for s in old:
        take(s, 2)
    with pytest.raises(DataError, match="different"):
        PackedStream(r, tok).load_resharded([old[1].state_dict(), old[0].state_dict()])


# -- determinism -----------------------------------------------------------------------------------------
def test_deterministic_for_a_seed(tmp_path, tok):
    r = recipe(tmp_path)
    a, b = take(PackedStream(r, tok), 20), take(PackedStream(r, tok), 20)
    assert all(rows_equal(x, y) for x, y in zip(a, b))
    c = take(PackedStream(recipe(tmp_path, seed=6), tok), 20)
    assert not all(rows_equal(x, y) for x, y in zip(a, c))
    d = take(PackedStream(r, tok, stage=0, seq_len=128), 5)
    assert d[0]["input_ids"].shape == (128,)


# -- held-out split ---------------------------------------------------------------------------------------
def test_heldout_documents_are_whole_and_never_trained_on(tmp_path, tok):
    r = recipe(tmp_path, heldout={"fraction": 0.1, "titles": ["l3"]})
    held = heldout_documents(r)
    titles = {t for t, _, _ in held}
    assert "l3" in titles and len(held) > 5 and {s for _, s, _ in held} <= {"short", "mid", "long"}
    assert all(text.startswith(t + " ") for t, _, text in held)  # whole documents, from their start
    train = take(PackedStream(r, tok), 150)
    by_pos = pos_titles(r, epochs=(0, 1))
    trained = {by_pos[(n, e, p)] for row in train for (n, e, p, _o) in row["docs"]}
    assert len(trained) > 50 and not trained & titles
    ho = list(PackedStream(r, tok, split="heldout", drop_last=False))
    ho_titles = {by_pos[(n, e, p)] for row in ho for (n, e, p, _o) in row["docs"]}
    assert ho_titles == titles
    assert len(heldout_documents(r, max_docs=3)) == 3
    assert is_heldout(r, "long", "l3", "anything")


# -- source types ---------------------------------------------------------------------------------------
def test_text_and_parquet_sources(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq
    d = tmp_path / "txt"
    d.mkdir()
    rng = random.Random(0)
    for i in range(5):
        (d / f"file{i}.txt").write_text(f"file{i} " + _text(rng, 300))
    pq.write_table(pa.table({"body": [f"pq{i} " + _text(rng, 200) for i in range(7)], "name": [f"p{i}" for i in range(7)]}),
                   tmp_path / "x.parquet")
    r = recipe(tmp_path, sources=[
        {"name": "txt", "type": "text", "path": str(d), "weight": 0.5, "repeat": False},
        {"name": "pq", "type": "parquet", "path": str(tmp_path / "*.parquet"), "text_field": "body",
         "title_field": "name", "weight": 0.5, "repeat": False}], heldout={"titles": ["file2", "p3"]})
    held = heldout_documents(r)
    assert sorted(t for t, _, _ in held) == ["file2", "p3"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = list(PackedStream(r, tok, drop_last=False))
    seen = {(n, p) for row in rows for (n, _e, p, _o) in row["docs"]}
    assert len(seen) == 5 - 1 + 7 - 1
    # resume in the middle of a parquet/text stream
    s = PackedStream(r, tok, drop_last=False)
    take(s, 3)
    s2 = PackedStream(r, tok, drop_last=False)
    s2.load_state_dict(s.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert all(rows_equal(a, b) for a, b in zip(rows[3:], s2))


# -- bad input ---------------------------------------------------------------------------------------
def test_missing_path_names_the_source(tmp_path):
    with pytest.raises(DataError, match=r"source 'ghost'.*nope\.jsonl.*matches no files"):
        recipe(tmp_path, sources=[{"name": "ghost", "path": str(tmp_path / "nope.jsonl")}])


def test_empty_source_names_it(tmp_path, tok):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    r = recipe(tmp_path, sources=[
        {"name": "ok", "path": write_jsonl(tmp_path / "ok.jsonl", 5, 10, 20), "weight": 0.5},
        {"name": "hollow", "path": str(tmp_path / "empty.jsonl"), "weight": 0.5}])
    with pytest.raises(DataError, match="source 'hollow' is empty"):
        take(PackedStream(r, tok), 3)


def test_malformed_lines_are_skipped_with_warning_then_fatal_above_fraction(tmp_path, tok):
    path = tmp_path / "dirty.jsonl"
    lines = open(write_jsonl(tmp_path / "clean.jsonl", 100, 20, 60)).read().splitlines()
    lines[41] = '{"text": "broken'
    path.write_text("\n".join(lines) + "\n")
    r = recipe(tmp_path, sources=[{"name": "dirty", "path": str(path), "repeat": False}], max_bad_fraction=0.05)
    with pytest.warns(UserWarning, match=r"dirty\.jsonl:42: malformed JSON"):
        rows = list(PackedStream(r, tok, drop_last=False))
    n_docs = len({p for row in rows for (_n, _e, p, _o) in row["docs"]})
    assert n_docs == 99
    for i in range(0, 100, 4):
        lines[i] = "not json"
    path.write_text("\n".join(lines) + "\n")
    r = recipe(tmp_path, sources=[{"name": "dirty", "path": str(path), "repeat": False}], max_bad_fraction=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match=r"source 'dirty'.*malformed.*max_bad_fraction"):
            list(PackedStream(r, tok))


def test_unknown_keys_suggest_the_closest(tmp_path):
    src = {"name": "a", "path": write_jsonl(tmp_path / "a.jsonl", 5, 10, 20), "wieght": 1.0}
    with pytest.raises(DataError, match="unknown key 'wieght'.*did you mean 'weight'"):
        recipe(tmp_path, sources=[src])
    with pytest.raises(DataError, match="unknown key 'stages_'.*did you mean 'stages'"):
        recipe(tmp_path, stages_=[])
    with pytest.raises(DataError, match="did you mean 'seq_len'"):
        recipe(tmp_path, stages=[{"seqlen": 128}])


def test_seq_len_above_model_limit_is_an_error(tmp_path, tok):
    with pytest.raises(DataError, match="16384 exceeds the 8192"):
        PackedStream(recipe(tmp_path, stages=[{"seq_len": 16384}]), tok)
    with pytest.raises(DataError, match="exceeds the 1024"):
        recipe(tmp_path, max_seq_len=1024, stages=[{"seq_len": 2048}])


def test_yaml_recipe_and_overrides(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", 5, 10, 20)
    (tmp_path / "r.yaml").write_text("sources:\n  - name: a\n    path: a.jsonl\nstages:\n  - seq_len: 64\n")
    r = load_recipe(tmp_path / "r.yaml", seed=9, **{"stages.0.seq_len": 32, "sources.a.min_doc_tokens": 3})
    assert (r.seed, r.stages[0].seq_len, r.sources[0].min_doc_tokens) == (9, 32, 3)
    with pytest.raises(DataError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_order_seed_reshuffles_training_rows_but_not_the_heldout_split(tmp_path, tok):
    """recipe.order_seed (the ablation's data-order seed): other training rows, the same held-out documents, and
    the stream fingerprint of a recipe without it unchanged."""
    base = recipe(tmp_path, heldout={"fraction": 0.1})
    other = recipe(tmp_path, heldout={"fraction": 0.1}, order_seed=99)
    assert base.shuffle_seed == 5 and other.shuffle_seed == 99
    a = take(PackedStream(base, tok, seq_len=256), 4)
    b = take(PackedStream(other, tok, seq_len=256), 4)
    assert not all(rows_equal(x, y) for x, y in zip(a, b))
    held_a, held_b = heldout_documents(base), heldout_documents(other)
    assert held_a == held_b and len(held_a) > 0
    assert PackedStream(base, tok, seq_len=256).fingerprint() != PackedStream(other, tok, seq_len=256).fingerprint()
    assert PackedStream(recipe(tmp_path, heldout={"fraction": 0.1}, order_seed=None), tok, seq_len=256).fingerprint() \
        == PackedStream(base, tok, seq_len=256).fingerprint()
