"""Side-by-side greedy continuations of held-out prompts by the dense and the MoD model.

People read text before tables: a perplexity ratio says little about whether the converted model still writes
sensible continuations. Each prompt is a window from the middle of a held-out document (beginnings are often
headers and licences); the document's own next tokens are shown beside both continuations.
"""
from __future__ import annotations

import torch

PROMPT_CHARS_SHOWN = 400
"""Characters of the prompt's end shown in the report (the model saw the whole prompt)."""


def prompts(docs, n: int, prompt_tokens: int, new_tokens: int) -> list[dict]:
    """Up to `n` prompts, one per document (EvalDoc), round-robin order: {"title", "source", "ids", "reference"}."""
    out = []
    for d in docs:
        if len(out) == n:
            break
        if len(d.ids) < prompt_tokens + new_tokens:
            continue
        s = (len(d.ids) - prompt_tokens - new_tokens) // 2
        out.append({"title": d.title, "source": d.source, "ids": d.ids[s:s + prompt_tokens],
                    "reference": d.ids[s + prompt_tokens:s + prompt_tokens + new_tokens]})
    return out


@torch.no_grad()
def greedy(model, ids: list[int], new_tokens: int, eos_id: int | None) -> list[int]:
    """Greedy continuation (the MoD model decodes with its own ragged KV cache, as generate() does)."""
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=eos_id, eos_token_id=eos_id)
    return out[0, x.shape[1]:].tolist()


def side_by_side(models: dict, tok, docs, n: int, prompt_tokens: int, new_tokens: int) -> list[dict]:
    """For each prompt: its text, the document's own continuation and each model's greedy continuation."""
    rows = []
    for p in prompts(docs, n, prompt_tokens, new_tokens):
        row = {"title": p["title"], "source": p["source"], "prompt": tok.decode(p["ids"]),
               "reference": tok.decode(p["reference"])}
        for name, model in models.items():
            row[name] = tok.decode(greedy(model, p["ids"], new_tokens, tok.eos_token_id))
        rows.append(row)
    return rows


def markdown(rows: list[dict], names: dict[str, str]) -> list[str]:
    """Report lines: per prompt, its end, the held-out continuation and each model's (`names`: key -> label)."""
    L = []
    for k, r in enumerate(rows, 1):
        L.append(f"\n**Sample {k}: '{r['title']}' ({r['source']})**, prompt (its last {PROMPT_CHARS_SHOWN} "
                 "characters):\n")
        L += _block(("..." if len(r["prompt"]) > PROMPT_CHARS_SHOWN else "") + r["prompt"][-PROMPT_CHARS_SHOWN:])
        for key, label in [("reference", "held-out text"), *names.items()]:
            L.append(f"\n{label}:\n")
            L += _block(r[key])
    return L


def _block(text: str) -> list[str]:
    fence = "````" if "```" in text else "```"
    return [f"{fence}text", text.rstrip("\n"), fence]
