"""Data recipe: the dataclasses behind `data_recipes/*.yaml`, and `load_recipe`.

A recipe says *what* to train on (sources and their token shares, filters, held-out split) and *how*
to cut it (a length curriculum of stages). Every field has a one-line doc; the YAML files repeat them
as comments. Weights are shares of **tokens after filtering and before packing** (after the min/max
length filters, the short-document keep-probability and the appended EOS). Packing never pads or drops
tokens, except the unfinished last row when a finite stream ends, so the shares are the same after
packing up to that one row.
"""
from __future__ import annotations

import dataclasses
import difflib
import glob
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from mod_train.config import ConfigError

SOURCE_TYPES = ("text", "jsonl", "parquet", "hub")


class DataError(ConfigError):
    """Any problem with a recipe or its inputs; the message names the source, file or key at fault."""


@dataclass
class StageConfig:
    """One step of the sequence-length curriculum."""

    seq_len: int
    """Packed row length in tokens for this stage."""
    tokens: Optional[int] = None
    """Token budget of the stage over all data-parallel ranks (None: unbounded stream)."""


@dataclass
class SourceConfig:
    """One data source of the mixture."""

    name: str
    """Short unique name; used in per-source loss logging and statistics."""
    type: str = "jsonl"
    """One of: text (one document per file), jsonl (one JSON object per line), parquet, hub."""
    path: Union[str, list[str], None] = None
    """Local file, directory or glob, or a list of them (text/jsonl/parquet); '~' and $VARS are expanded;
    relative paths are taken relative to the recipe file; `{corpus}` = the offline corpus folder
    ($MOD_TRAIN_CORPUS, else mod_train.offline.cache_root()/corpus)."""
    hub_id: Optional[str] = None
    """Dataset id for type=hub, streamed with `datasets.load_dataset(id, streaming=True)` (online only)."""
    hub_config: Optional[str] = None
    """Dataset configuration name for type=hub (None: the default one)."""
    hub_split: str = "train"
    """Split streamed for type=hub."""
    text_field: str = "text"
    """Record field holding the document text (jsonl/parquet/hub)."""
    title_field: Optional[str] = "title"
    """Record field holding a document title (used to name held-out documents); None: no title."""
    weight: float = 1.0
    """Share of tokens for this source; all weights are normalised to sum to 1 (with a notice)."""
    min_doc_tokens: int = 1
    """Documents with fewer tokens (EOS included) are dropped."""
    max_doc_tokens: Optional[int] = None
    """Longer documents are truncated to this many tokens (None: keep whole)."""
    short_doc_tokens: int = 0
    """Documents shorter than this count as 'short' for `short_keep_prob` (0: none are short)."""
    short_keep_prob: float = 1.0
    """Probability of keeping a short document: < 1 up-samples long documents (Fu et al. 2024)."""
    repeat: Union[bool, int] = True
    """true: cycle forever (reshuffled each epoch); false: one pass; an integer: that many passes.
    An exhausted source drops out and the others share its weight (a warning says so)."""
    shuffle_block: int = 1024
    """Documents are shuffled within consecutive blocks of this many (0/1: keep file order); file
    order is also shuffled per epoch. Bounded memory, and resumable by skipping whole blocks."""


@dataclass
class HeldoutConfig:
    """Held-out split for evaluation, by whole documents (never windows of training documents)."""

    fraction: float = 0.0
    """Share of each source's documents held out, chosen by a seeded hash of the document."""
    titles: list[str] = field(default_factory=list)
    """Documents whose title is in this list are always held out (e.g. 'hamlet')."""
    unseen: list[SourceConfig] = field(default_factory=list)
    """Evaluation-only sources from domains that no training source contains (every document held out):
    how the model does on text it never saw, reported apart from the in-domain held-out documents. Their
    files are checked when evaluation reads them, not when training starts."""


@dataclass
class Recipe:
    """A complete data recipe (see data_recipes/offline_long_mix.yaml for a commented example)."""

    sources: list[SourceConfig]
    """The mixture's sources."""
    stages: list[StageConfig]
    """The length curriculum, in order."""
    name: str = "recipe"
    """A name for logs."""
    tokenizer: str = "smollm2"
    """HF tokenizer directory or hub id; 'smollm2' = the offline SmolLM2 (mod_train.offline.smollm2_path)."""
    max_seq_len: Optional[int] = None
    """Longest allowed seq_len; None: read from the tokenizer directory's config.json
    (max_position_embeddings) or the tokenizer's model_max_length."""
    append_eos: bool = True
    """Append an end-of-document token to every document."""
    eos_token: Optional[str] = None
    """Token appended when append_eos (None: the tokenizer's eos_token)."""
    seed: int = 1234
    """Seed of every random choice (shuffles, keep-probabilities, held-out split)."""
    order_seed: Optional[int] = None
    """Seed of the training order alone (file and record shuffles, keep-probabilities); None: `seed`. Another
    value reshuffles the data a run sees without moving the held-out split (a data-order seed for ablations)."""
    heldout: HeldoutConfig = field(default_factory=HeldoutConfig)
    """Held-out split by whole documents."""
    max_bad_fraction: float = 0.01
    """Malformed JSON lines are skipped with a warning; above this fraction of a file's lines the build fails."""
    tokenize_batch: int = 16
    """Documents tokenised together per call (per source)."""
    open_docs: int = 4
    """Documents open at once per source: each row piece goes to the source furthest below its token share,
    from its open documents in turn, so any window of rows holds the shares (docs/data.md); 1 = pack each
    document whole before the next (no interleaving: a long document fills consecutive rows)."""
    path: Optional[str] = None
    """The YAML file this recipe came from (set by load_recipe)."""

    @property
    def shuffle_seed(self) -> int:
        """The seed of the data order: order_seed, else seed."""
        return self.seed if self.order_seed is None else self.order_seed

    def normalised_weights(self) -> list[float]:
        total = sum(s.weight for s in self.sources)
        return [s.weight / total for s in self.sources]

    def stage(self, stage: int) -> StageConfig:
        if not 0 <= stage < len(self.stages):
            raise DataError(f"stage {stage} does not exist: the recipe has {len(self.stages)} stage(s)")
        return self.stages[stage]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


DataConfig = Recipe  # the name the rest of the project may use


# ---------------------------------------------------------------------------------------------
def _closest(key: str, valid) -> str:
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.0)
    return f"; did you mean '{match[0]}'?" if match else ""


def _build(cls, raw: Any, where: str):
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a mapping, got {type(raw).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise DataError(f"{where}: unknown key '{key}'{_closest(key, names)} (valid keys: {', '.join(sorted(names))})")
    kwargs = dict(raw)
    if cls is Recipe:
        if "sources" not in kwargs or not kwargs["sources"]:
            raise DataError(f"{where}: 'sources' is missing or empty")
        if "stages" not in kwargs or not kwargs["stages"]:
            raise DataError(f"{where}: 'stages' is missing or empty")
        kwargs["sources"] = [_build(SourceConfig, s, f"{where}: sources[{i}]") for i, s in enumerate(kwargs["sources"])]
        kwargs["stages"] = [_build(StageConfig, s, f"{where}: stages[{i}]") for i, s in enumerate(kwargs["stages"])]
        if "heldout" in kwargs and kwargs["heldout"] is not None:
            h = dict(kwargs["heldout"])
            h["unseen"] = [_build(SourceConfig, s, f"{where}: heldout.unseen[{i}]")
                           for i, s in enumerate(h.get("unseen") or [])]
            kwargs["heldout"] = _build(HeldoutConfig, h, f"{where}: heldout")
        elif "heldout" in kwargs:
            kwargs["heldout"] = HeldoutConfig()
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field missing
        raise DataError(f"{where}: {e}") from None


def _set_override(d: dict, dotted: str, value: Any) -> None:
    """`seed=3`, `stages.0.seq_len=4096`, `sources.code.weight=0.5` (a source by name or index)."""
    parts = dotted.replace("__", ".").split(".")
    cur: Any = d
    for p in parts[:-1]:
        if isinstance(cur, list):
            if p.isdigit():
                cur = cur[int(p)]
            else:
                named = [x for x in cur if isinstance(x, dict) and x.get("name") == p]
                if not named:
                    raise DataError(f"override '{dotted}': no list entry named '{p}'")
                cur = named[0]
        else:
            cur = cur.setdefault(p, {})
    last = parts[-1]
    if isinstance(cur, list):
        cur[int(last)] = value
    else:
        cur[last] = value


def load_recipe(path: Union[str, Path, dict], **overrides) -> Recipe:
    """Read and validate a YAML recipe (or a dict). Overrides are dotted keys, e.g.
    `load_recipe(p, seed=3, **{"stages.0.seq_len": 1024, "sources.code.weight": 0.5})`."""
    import yaml

    if isinstance(path, dict):
        raw, where, base = dict(path), "recipe", Path.cwd()
    else:
        p = Path(path)
        if not p.is_file():
            raise DataError(f"recipe file not found: {p}")
        with open(p) as f:
            raw = yaml.safe_load(f) or {}
        where, base = str(p), p.resolve().parent
        raw.setdefault("path", str(p))
    import copy
    raw = copy.deepcopy(raw)
    for k, v in overrides.items():
        _set_override(raw, k, v)
    recipe = _build(Recipe, raw, where)
    validate(recipe, base)
    return recipe


def corpus_dir() -> Path:
    from mod_train.offline import cache_root
    return Path(os.environ.get("MOD_TRAIN_CORPUS", cache_root() / "corpus"))


def resolve_path(p: str, base: Path | None = None) -> str:
    if "{corpus}" in p:
        p = p.replace("{corpus}", str(corpus_dir()))
    p = os.path.expandvars(os.path.expanduser(p))
    if base is not None and not os.path.isabs(p):
        p = str(base / p)
    return p


def source_files(src: SourceConfig, base: Path | None = None) -> list[str]:
    """The sorted list of local files of a source; raises DataError naming the source if none."""
    files: list[str] = []
    for raw in ([src.path] if isinstance(src.path, str) else list(src.path or [])):
        p = resolve_path(str(raw), base)
        if os.path.isdir(p):
            pattern = {"jsonl": "*.jsonl", "parquet": "*.parquet", "text": "*"}[src.type]
            found = sorted(glob.glob(os.path.join(p, "**", pattern), recursive=True))
        else:
            found = sorted(glob.glob(p, recursive=True))
        found = [f for f in found if os.path.isfile(f)]
        if not found:
            hint = " (run `python launch/fetch_corpus.py` first)" if "{corpus}" in str(raw) else ""
            raise DataError(f"source '{src.name}': path '{raw}' (resolved: {p}) matches no files{hint}")
        files.extend(f for f in found if f not in files)
    return files


def validate(recipe: Recipe, base: Path | None = None) -> None:
    names = [s.name for s in recipe.sources]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise DataError(f"duplicate source names: {sorted(dup)}")
    for s in recipe.sources:
        w = f"source '{s.name}'"
        if s.type not in SOURCE_TYPES:
            raise DataError(f"{w}: unknown type '{s.type}'{_closest(s.type, SOURCE_TYPES)}")
        if not (s.weight > 0):
            raise DataError(f"{w}: weight must be > 0, got {s.weight}")
        if not 0 < s.short_keep_prob <= 1:
            raise DataError(f"{w}: short_keep_prob must be in (0, 1], got {s.short_keep_prob}")
        if s.max_doc_tokens is not None and s.max_doc_tokens < s.min_doc_tokens:
            raise DataError(f"{w}: max_doc_tokens {s.max_doc_tokens} < min_doc_tokens {s.min_doc_tokens}")
        if s.type == "hub":
            if not s.hub_id:
                raise DataError(f"{w}: type 'hub' needs hub_id")
        else:
            if not s.path:
                raise DataError(f"{w}: type '{s.type}' needs a path")
            source_files(s, base)  # raises if missing
    for i, st in enumerate(recipe.stages):
        if st.seq_len < 2:
            raise DataError(f"stages[{i}]: seq_len must be >= 2, got {st.seq_len}")
        if st.tokens is not None and st.tokens < st.seq_len:
            raise DataError(f"stages[{i}]: token budget {st.tokens} is below one row of {st.seq_len}")
    if recipe.max_seq_len is not None:
        check_seq_len(recipe, recipe.max_seq_len)
    if not 0 <= recipe.heldout.fraction < 1:
        raise DataError(f"heldout.fraction must be in [0, 1), got {recipe.heldout.fraction}")
    for s in recipe.heldout.unseen:
        if s.name in names:
            raise DataError(f"heldout.unseen source '{s.name}': a training source has that name; an unseen "
                            "domain must be a source no training mixture contains")
        if s.type not in SOURCE_TYPES or (s.type != "hub" and not s.path):
            raise DataError(f"heldout.unseen source '{s.name}': needs a type of {SOURCE_TYPES} and a path")
    if type(recipe.open_docs) is not int or recipe.open_docs < 1:
        raise DataError(f"open_docs must be an integer >= 1 (documents open per source; 1 = no interleaving), "
                        f"got {recipe.open_docs!r}")
    if not 0 <= recipe.max_bad_fraction <= 1:
        raise DataError(f"max_bad_fraction must be in [0, 1], got {recipe.max_bad_fraction}")
    total = sum(s.weight for s in recipe.sources)
    if abs(total - 1.0) > 1e-6:
        warnings.warn(f"recipe '{recipe.name}': source weights sum to {total:g}, normalised to 1 "
                      f"({', '.join(f'{s.name}={s.weight / total:.3f}' for s in recipe.sources)})", stacklevel=3)


def check_seq_len(recipe: Recipe, limit: int) -> None:
    for i, st in enumerate(recipe.stages):
        if st.seq_len > limit:
            raise DataError(f"stages[{i}]: seq_len {st.seq_len} exceeds the {limit} tokens the tokenizer/model "
                            f"supports (set max_seq_len in the recipe if the model was extended)")
