"""Data recipes -> streamed, packed, resumable training rows for long-context MoD conversion.

Public API (see docs/data.md for the recipe format, the resume design and throughput figures)::

    from mod_train.data import load_recipe, PackedStream, collate, heldout_documents

    recipe = load_recipe("data_recipes/offline_long_mix.yaml", seed=7)   # -> Recipe (alias DataConfig)
    stream = PackedStream(recipe, tokenizer=None, stage=0, dp_rank=0, dp_world_size=1, split="train")
    row = next(stream)      # input_ids, position_ids, doc_ids, labels, source_ids: LongTensor[seq_len],
                            # sources: list[str], docs: list[(source, epoch, position, offset)]
    batch = collate([row, next(stream)])                  # dict of [B, S] tensors (+ lists)
    state = stream.state_dict(); stream2.load_state_dict(state)   # exact, fast resume
    docs = heldout_documents(recipe, max_docs=8)          # [(title, source, text)], whole documents

- `Recipe` / `DataConfig`, `SourceConfig`, `StageConfig`, `HeldoutConfig`: dataclasses (recipe.py).
- `DataError`: every bad-input error (missing path, empty source, unknown key, bad lines, seq_len).
- `load_tokenizer(recipe)`: the recipe's tokenizer ('smollm2' = the offline SmolLM2).
- `stream.source_names[source_ids]` names the source of each token (per-source loss logging).
- Offline corpus: `python launch/fetch_corpus.py` (mod_train.data.corpus.fetch_corpus).
- Statistics / shards: mod_train.data.build (used by launch/build_data.py).
- What a run trains on: `build_stream(recipe_or_"synthetic", seq_len=, seed=, dp_rank=, dp_world_size=)`
  (streams.py): the recipe's length curriculum (`CurriculumStream`) or deterministic random rows
  (`SyntheticStream`), both exactly resumable.
"""
from mod_train.data.recipe import (DataConfig, DataError, HeldoutConfig, Recipe, SourceConfig, StageConfig,
                                   load_recipe)
from mod_train.data.stream import (IGNORE_INDEX, TENSOR_KEYS, PackedStream, collate, heldout_documents,
                                   load_tokenizer)
from mod_train.data.streams import CurriculumStream, StepRows, SyntheticStream, build_stream

__all__ = ["DataConfig", "DataError", "HeldoutConfig", "Recipe", "SourceConfig", "StageConfig", "load_recipe",
           "IGNORE_INDEX", "TENSOR_KEYS", "PackedStream", "collate", "heldout_documents", "load_tokenizer",
           "CurriculumStream", "StepRows", "SyntheticStream", "build_stream"]
