"""Everything about a run that can be checked cheaply, checked before any model weight is loaded.

    plan = preflight(spec, tc)     # raises PreflightError (a ValueError): one line naming field, value, fix

`Trainer.setup` calls it first; a launcher can call it too, before starting ranks, and print the
error as one line (every exception whose message is the whole story derives from mod_train.config.UserError).

Checked: every model location (RunSpec.model, .teacher, .tokenizer: a missing local folder is reported as
such, never as a bad hub id) and the configs of the model and the KD teacher (read, not the weights; the
teacher's vocabulary must be the student's); the DeepSpeed config file; the recipe (loads and validates); the
output directory (created and writable); numeric ranges of TrainConfig the dataclass leaves open;
every sequence length against the model's max_position_embeddings; and the tokenizer:

The tokenizer is one decision per run: `RunSpec.tokenizer`, else the model's own, tokenises the data
and is shipped with the export. A recipe whose `tokenizer:` names a different tokenizer is refused
with both names unless `RunSpec.allow_tokenizer_mismatch` (the run's tokenizer is used anyway).
Tokenizers are compared by content (vocabulary, merges, added tokens), not by name, so the recipe's
`smollm2` and the offline SmolLM2 model directory agree. `tokenizer: model` in a recipe means "the
training model's own tokenizer".
"""
from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from mod_train.config import ConfigError
from mod_train.data.stream import MODEL_TOKENIZER
from mod_train.paths import MissingPathError, check_model_location, looks_local

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class PreflightError(ConfigError):
    """A setting cannot work; the message names the field, its value and the fix."""


@dataclass
class Plan:
    """What preflight found, reused by the trainer so nothing is read twice."""

    hf_config: object
    """The dense model's transformers config (no weights loaded)."""
    tokenizer: object | None
    """The run's tokenizer (None: no tokenizer found, allowed for synthetic data only)."""
    tokenizer_source: str | None
    """Where the run's tokenizer comes from (RunSpec.tokenizer or RunSpec.model)."""
    tokenizer_id: str | None
    """Content hash of the run's tokenizer (part of the resume fingerprint)."""
    recipe: str
    """The recipe as the fingerprint records it: 'synthetic...' or the resolved YAML path."""


def _fail(field: str, value, why: str, fix: str):
    raise PreflightError(f"{field} = {value!r}: {why}; {fix}")


# -- numbers -----------------------------------------------------------------------------------------

_RANGES = {  # field: (lowest allowed, meaning, a typical value)
    "log_every": (1, "log every N optimizer steps", 1),
    "save_every": (0, "checkpoint every N steps, 0 = only at the end and on a signal", 500),
    "exit_after_steps": (0, "0 = off", 0),
    "warmup_steps": (0, "linear warm-up steps", 50),
    "grad_clip": (0, "0 disables clipping", 1.0),
    "weight_decay": (0, "AdamW weight decay", 0.0),
}


def check_numbers(tc) -> None:
    """The ranges TrainConfig.validate leaves open."""
    for name, (lo, meaning, typical) in _RANGES.items():
        v = getattr(tc, name)
        if not isinstance(v, (int, float)) or v < lo:
            _fail(f"train.{name}", v, f"must be >= {lo} ({meaning})", f"e.g. --train.{name} {typical}")
    if tc.seq_len is not None and tc.seq_len < 2:
        _fail("train.seq_len", tc.seq_len, "must be >= 2 (a row of one token has no next token to predict)",
              "set --train.seq_len 2048 or leave it unset to use the recipe's stages")
    if not tc.eps > 0:
        _fail("train.eps", tc.eps, "must be > 0", "set --train.eps 1e-8")
    if len(tc.betas) != 2 or not all(0 <= b < 1 for b in tc.betas):
        _fail("train.betas", list(tc.betas), "must be two numbers in [0, 1)", "set --train.betas [0.9,0.95]")


# -- files and folders -----------------------------------------------------------------------------

def check_out(out) -> None:
    """Create `out` and prove it writable (a probe file named after this host and process)."""
    p = Path(out)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".write_probe.{socket.gethostname()}.{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        _fail("RunSpec.out", str(out), f"cannot write there ({e.strerror or e})",
              "choose a directory you can write to (--out)")


_MODEL_FIELDS = ("model", "teacher", "tokenizer")  # the RunSpec fields naming a model folder or hub id


def check_locations(spec) -> None:
    """Every model location the run reads (RunSpec.model, .teacher, .tokenizer where set) is an existing local
    folder or can be a hub id (mod_train.paths); nothing is read. Cheap enough for a launcher to call first."""
    for name in _MODEL_FIELDS:
        value = getattr(spec, name, None)
        if value is not None:
            check_model_location(value, f"RunSpec.{name}")


def read_model_config(model: str, field: str = "RunSpec.model"):
    """The transformers config of the model `field` names (a local folder must hold config.json; no weights)."""
    check_model_location(model, field)
    if looks_local(model) and not (Path(model).expanduser() / "config.json").is_file():
        _fail(field, model, "the folder has no config.json",
              f"point --{field.split('.')[-1]} at a Hugging Face model directory")
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as e:
        _fail(field, model, f"cannot read its config ({str(e).splitlines()[0]})",
              "give a model directory or a reachable hub id")


def check_teacher(teacher: str, hf_config) -> None:
    """The KD teacher's config is readable and its vocabulary is the student's (distillation compares
    next-token distributions), checked before either model is loaded."""
    vt, vs = read_model_config(teacher, "RunSpec.teacher").vocab_size, hf_config.vocab_size
    if vt != vs:
        _fail("RunSpec.teacher", teacher, f"its vocabulary has {vt} tokens, the student's {vs} (distillation "
              "compares next-token distributions)", "give a teacher that uses the student's tokenizer")


def check_ds(ds) -> None:
    if isinstance(ds, str) and not Path(ds).is_file():
        _fail("RunSpec.ds", ds, "file not found", "give a DeepSpeed config such as ds_configs/zero1.json")


# -- tokenizer --------------------------------------------------------------------------------------

def tokenizer_identity(tok) -> str:
    """A content hash of the tokenizer model (vocabulary, merges) and its added tokens with their ids."""
    import xxhash
    if getattr(tok, "is_fast", False):
        d = json.loads(tok.backend_tokenizer.to_str())
        key = {"model": d.get("model"), "added": sorted((t["id"], t["content"]) for t in d.get("added_tokens", []))}
    else:
        key = {"vocab": sorted(tok.get_vocab().items())}
    return xxhash.xxh3_128_hexdigest(json.dumps(key, sort_keys=True, default=str).encode())


def _has_tokenizer_files(folder: str) -> bool:
    return any((Path(folder).expanduser() / f).is_file() for f in _TOKENIZER_FILES)


def load_run_tokenizer(spec, needed: bool):
    """(tokenizer, source) of the run: RunSpec.tokenizer, else the model's own; (None, None) if the model
    folder has none and `needed` is False."""
    from transformers import AutoTokenizer
    source, field = (spec.tokenizer, "RunSpec.tokenizer") if spec.tokenizer else (spec.model, "RunSpec.model")
    if looks_local(source) and not _has_tokenizer_files(source):
        if not needed:
            return None, None
        _fail(field, source, "has no tokenizer files, and a data recipe must be tokenised by the model's tokenizer",
              "pass the tokenizer the model was trained with (--tokenizer DIR)")
    try:
        return AutoTokenizer.from_pretrained(source), str(source)
    except (OSError, ValueError) as e:
        if not needed:
            return None, None
        _fail(field, source, f"cannot load its tokenizer ({str(e).splitlines()[0]})", "pass --tokenizer DIR")


def resolve_recipe_tokenizer(name: str) -> str:
    if name == "smollm2":
        from mod_train.offline import smollm2_path
        return str(smollm2_path())
    return name


def check_tokenizer_agreement(recipe, tok, source: str, allow_mismatch: bool) -> None:
    """Refuse a recipe whose `tokenizer:` differs in content from the run's tokenizer."""
    if allow_mismatch or recipe.tokenizer in (None, MODEL_TOKENIZER):
        return
    wanted = resolve_recipe_tokenizer(recipe.tokenizer)
    if os.path.realpath(os.path.expanduser(wanted)) == os.path.realpath(os.path.expanduser(source)):
        return
    from transformers import AutoTokenizer
    fix = (f"use a recipe with `tokenizer: {MODEL_TOKENIZER}` (or the model's tokenizer), pass --tokenizer "
           f"{recipe.tokenizer}, or set allow_tokenizer_mismatch to tokenise with {source} anyway")
    try:
        other = AutoTokenizer.from_pretrained(wanted)
    except (OSError, ValueError) as e:
        _fail("recipe tokenizer", recipe.tokenizer, f"cannot be loaded to compare with the run's tokenizer {source} "
              f"({str(e).splitlines()[0]})", fix)
    if tokenizer_identity(other) != tokenizer_identity(tok):
        _fail("recipe tokenizer", recipe.tokenizer, f"differs from the run's tokenizer {source} "
              f"({len(other)} vs {len(tok)} tokens, different vocabulary or merges)", fix)


def check_tokenizer_fits(tok, source: str, hf_config, recipe) -> None:
    vocab = getattr(hf_config, "vocab_size", None)
    if vocab is not None and len(tok) > vocab:
        _fail("tokenizer", source, f"has {len(tok)} tokens but the model's vocabulary has {vocab}",
              "use the model's own tokenizer")
    if recipe is not None and recipe.append_eos:
        eos = recipe.eos_token or tok.eos_token
        if eos is None or eos not in tok.get_vocab():
            _fail("recipe eos_token", eos, f"is not a token of the run's tokenizer {source}",
                  "set `eos_token: null` in the recipe (the tokenizer's own) or a token it has")


# -- recipe and lengths -------------------------------------------------------------------------------

def load_recipe_checked(recipe: str, overrides: dict | None = None):
    """(Recipe or None for synthetic, the fingerprint's spelling of it); `overrides`: RunSpec.data."""
    if recipe == "synthetic" or recipe.startswith("synthetic:"):
        return None, recipe
    from mod_train.data import DataError, load_recipe
    if not Path(recipe).is_file():
        _fail("RunSpec.recipe", recipe, f"file not found (resolved: {Path(recipe).resolve()})",
              "give a data recipe YAML (data_recipes/*.yaml) or 'synthetic'")
    try:
        return load_recipe(recipe, **(overrides or {})), str(Path(recipe).resolve())
    except DataError as e:
        raise PreflightError(f"RunSpec.recipe = {recipe!r}: {e}") from None


def seq_lens(tc, recipe) -> list:
    if tc.seq_len is not None:
        return [tc.seq_len]
    return [s.seq_len for s in recipe.stages] if recipe is not None else [2048]


def check_lengths(lens: list, max_positions: int | None, recipe) -> None:
    limit = recipe.max_seq_len if recipe is not None and recipe.max_seq_len else max_positions
    for n in lens:
        if n < 2:
            _fail("seq_len", n, "must be >= 2", "set --train.seq_len or the recipe's stage seq_len")
        if limit is not None and n > limit:
            _fail("seq_len", n, f"exceeds the model's {limit} positions (max_position_embeddings)",
                  f"use --train.seq_len <= {limit}, or a model config with a longer context")


def preflight(spec, tc) -> Plan:
    """Check everything cheap about a run (see the module docstring); raise PreflightError or return the Plan."""
    try:
        return _preflight(spec, tc)
    except (MissingPathError, ConfigError) as e:
        raise PreflightError(str(e)) from None


def _preflight(spec, tc) -> Plan:
    tc.validate()
    check_numbers(tc)
    check_ds(spec.ds)
    recipe, recipe_key = load_recipe_checked(spec.recipe, getattr(spec, "data", None))
    check_locations(spec)
    hf_config = read_model_config(spec.model)
    if spec.teacher is not None and tc.uses_teacher:
        check_teacher(spec.teacher, hf_config)
    check_lengths(seq_lens(tc, recipe), getattr(hf_config, "max_position_embeddings", None), recipe)
    tok, source = load_run_tokenizer(spec, needed=recipe is not None)
    if tok is not None:
        check_tokenizer_fits(tok, source, hf_config, recipe)
    if recipe is not None:
        check_tokenizer_agreement(recipe, tok, source, spec.allow_tokenizer_mismatch)
    check_out(spec.out)
    return Plan(hf_config=hf_config, tokenizer=tok, tokenizer_source=source,
                tokenizer_id=tokenizer_identity(tok) if tok is not None else None, recipe=recipe_key)
