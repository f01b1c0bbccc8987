"""Dense vs MoD evaluation -> a Markdown report with tables and PNG plots (used by launch/eval.py).

    from mod_train.eval import EvalConfig, run_eval
    res = run_eval(EvalConfig(dense="dense_dir", mod="mod_dir", recipe="data_recipes/offline_long_mix.yaml",
                              out="runs/eval", lengths=[512, 2048, 8192], max_docs=4))

Writes into `out`: report.md, results.json, rate_per_layer.png, routing_map.png, gate_hist.png,
adaptivity_in_domain.png (+ adaptivity_unseen.png with unseen text) and quality_vs_kv.png (threshold routing
only). What is measured (see metrics.py for the exact rules):
- held-out perplexity of both models at each context length (non-overlapping windows, token weighted);
- per routed layer: execution rate, mean gate, share of gates within 0.05 of the threshold p, histogram;
- how token-adaptive the routing is at the longest context, on in-domain and on unseen-domain text: routed layers
  partly run, their share of the routed compute, the KV fraction, a verdict (adaptivity.py);
- KV-cache bytes and prefill time of one prefill (MoDCache vs the dense model's own cache);
- quality against KV memory: thresholds calibrated post hoc (calibrate_thresholds) on held-out text that
  is not evaluated, for each target rate; perplexity, realised rate, ideal and measured KV fraction;
- when asked (EvalConfig.tasks / passkey / needle / samples): lm-evaluation-harness tasks with the MoD model's
  realised rate per task (lm_harness.py, local tasks in local_tasks.py), passkey and key-value needle retrieval
  with the rate at the needle and a heatmap per model (retrieval.py), greedy continuations side by side
  (samples.py). Task names and retrieval lengths are checked before any measurement.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from mod_train.config import EvalConfig
from mod_train.eval import adaptivity as A
from mod_train.eval import metrics as M
from mod_train.eval import plots
from mod_train.eval.data import calibration_batches, load_eval_docs


def _load(cfg: EvalConfig):
    import mod_train  # noqa: F401  (registers the MoD Auto classes)
    from transformers import AutoModelForCausalLM
    from mod_train import MoDConfig, modify
    dt = getattr(torch, cfg.dtype)
    dense = AutoModelForCausalLM.from_pretrained(cfg.dense, dtype=dt).eval()
    if cfg.mod:
        mod = AutoModelForCausalLM.from_pretrained(cfg.mod, dtype=dt).eval()
    elif cfg.mod_from_dense:
        mod = modify(AutoModelForCausalLM.from_pretrained(cfg.dense, dtype=dt), MoDConfig.from_dict(cfg.mod_overrides))
        mod.eval()
    else:
        raise ValueError("give a MoD model (mod=...) or mod_from_dense=True")
    if not M.is_mod(mod):
        raise ValueError(f"{cfg.mod} is not a MoD model (model_type {mod.config.model_type!r})")
    return dense, mod


def _bar(cfg, total, desc):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="tok", disable=not cfg.progress, leave=False)


def _fmt_bytes(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(b) < 1024 or unit == "GiB":
            return f"{b:.1f} {unit}" if unit != "B" else f"{int(b)} B"
        b /= 1024
    return str(b)


def run_eval(cfg: EvalConfig) -> dict:
    from mod_train.data import load_recipe, load_tokenizer
    if cfg.dense is None:
        from mod_train.offline import resolve_model
        cfg.dense = resolve_model("smollm2")
    cfg.validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    recipe = load_recipe(cfg.recipe)
    tok = load_tokenizer(recipe)
    tasks = _task_manager(cfg, recipe, out) if cfg.tasks else None
    dense, mod = _load(cfg)
    if cfg.passkey or cfg.needle:
        from mod_train.eval.retrieval import check_fits, check_lengths
        check_lengths(cfg.retrieval_lengths, dense, "dense model")
        check_lengths(cfg.retrieval_lengths, mod, "MoD model")
        check_fits(_retrieval_tasks(cfg), tok, cfg.retrieval_lengths, cfg.retrieval_distractors)
    if len(tok) > dense.config.vocab_size:
        raise ValueError(f"the recipe's tokenizer has {len(tok)} tokens, the model {dense.config.vocab_size}")
    lengths = sorted(int(x) for x in cfg.lengths)
    docs, cal_docs = load_eval_docs(recipe, tok, cfg.max_docs, cfg.calib_docs, cfg.max_tokens, cfg.calib_tokens)
    ids = [d.ids for d in docs]
    n_tok = sum(len(x) for x in ids)
    mcfg = mod.mod_config
    res = {"config": dataclasses.asdict(cfg), "mod_config": mcfg.to_dict(), "routed_layers": mod.routed_layers,
           "num_layers": mod.config.num_hidden_layers,
           "docs": [{"title": d.title, "source": d.source, "tokens": len(d.ids), "full_tokens": d.full_tokens}
                    for d in docs],
           "calibration_docs": [{"title": d.title, "source": d.source, "tokens": len(d.ids)} for d in cal_docs],
           "ppl": {}, "routing": {}}
    # -- perplexity and routing at each context length --
    res["ppl"], res["routing"], stats_by_len = _ppl_rows(cfg, dense, mod, ids, lengths, "")
    # -- one prefill: KV bytes and time --
    P = min(cfg.prefill_tokens or lengths[-1], len(ids[0]))
    pre_ids = torch.tensor(ids[0][:P])[None]
    res["prefill"] = {"dense": M.prefill(dense, pre_ids, repeats=2), "mod": M.prefill(mod, pre_ids, repeats=2)}
    # -- the same on text from domains the training mixture never contains --
    unseen_ids = None
    if cfg.unseen and recipe.heldout.unseen:
        from mod_train.data import DataError
        try:
            unseen, unseen_ids = _unseen(cfg, recipe, tok, dense, mod, lengths)
            res.update(unseen)
        except DataError as e:  # e.g. a machine without apt-get could not fetch them: said, not hidden
            res["unseen_missing"] = str(e)
            print(f"[mod_train] warning: no unseen-domain evaluation: {e}", flush=True)
    if cfg.pruning_baseline:
        _pruning_baseline(cfg, res, dense, mod, lengths, ids, unseen_ids, cal_docs)
    # -- quality against KV memory over calibrated target rates --
    sweep = []
    SL = cfg.sweep_length or lengths[0]
    dense_sweep_ppl = res["ppl"][str(SL)]["dense"]["ppl"] if str(SL) in res["ppl"] else \
        M.perplexity(dense, ids, SL).ppl
    dense_kv = res["prefill"]["dense"]["kv_bytes"]
    if mcfg.routing == "threshold" and cfg.targets:
        batches = calibration_batches(cal_docs, min(SL, cfg.calib_tokens))
        orig = mcfg
        for t in cfg.targets:
            mod.set_mod_config(orig)
            th = mod_calibrate(mod, batches, float(t))
            st = M.RoutingStats()
            with _bar(cfg, n_tok, f"sweep t={t} @{SL}") as bar:
                r = M.perplexity(mod, ids, SL, st, bar)
            kv = M.prefill(mod, pre_ids)
            sweep.append({"target": float(t), "ppl": r.ppl, "loss": r.loss, "rate": st.mean_rate(),
                          "rates": {str(j): s.rate for j, s in sorted(st.layers.items())},
                          "kv_ideal": M.ideal_kv_fraction(mod, st.mean_rate()),
                          "kv_measured": kv["kv_bytes"] / max(dense_kv, 1), "kv_bytes": kv["kv_bytes"],
                          "thresholds": {str(k): v for k, v in sorted(th.items())}})
        mod.set_mod_config(orig)
    res["sweep"] = {"length": SL, "dense_ppl": dense_sweep_ppl, "points": sweep}
    res.update(_field_benchmarks(cfg, recipe, tok, dense, mod, docs, tasks, out))
    res["seconds"] = time.time() - t_start
    # -- plots --
    figs = {}
    rates = {L: {j: s.rate for j, s in st.layers.items()} for L, st in stats_by_len.items()}
    plots.rate_per_layer(rates, out / "rate_per_layer.png")
    figs["rate"] = "rate_per_layer.png"
    st0 = stats_by_len[lengths[-1]]
    if st0.sample_map is not None:
        plots.routing_map(st0.sample_map, st0.sample_layers, out / "routing_map.png",
                          f"tokens that ran each routed layer: '{docs[0].title}', first {st0.sample_map.shape[1]} tokens")
        figs["map"] = "routing_map.png"
    plots.gate_histogram({j: s.hist for j, s in st0.layers.items()}, {j: s.threshold for j, s in st0.layers.items()},
                         out / "gate_hist.png")
    figs["hist"] = "gate_hist.png"
    res["adaptivity"] = _adaptivity(res, mod, lengths[-1])
    for name, ad in res["adaptivity"].items():
        if ad is not None:
            A.histogram_png(ad["rates"], out / f"adaptivity_{name}.png",
                            f"routed layers per execution rate ({name.replace('_', '-')} text, ctx {lengths[-1]})")
            figs[f"adaptivity_{name}"] = f"adaptivity_{name}.png"
    if sweep:
        plots.quality_vs_memory(sweep, dense_sweep_ppl, out / "quality_vs_kv.png", SL)
        figs["sweep"] = "quality_vs_kv.png"
    res["figures"] = figs
    (out / "results.json").write_text(json.dumps(res, indent=1, default=float))
    (out / "report.md").write_text(render(res, stats_by_len))
    return res


def _ppl_rows(cfg: EvalConfig, dense, mod, ids, lengths, label: str) -> tuple[dict, dict, dict]:
    """Perplexity of both models at each context length on `ids`, with the MoD model's routing statistics:
    ({length: {dense, mod}}, {length: per-layer routing}, {length: RoutingStats})."""
    ppl, routing, stats = {}, {}, {}
    n_tok = sum(len(x) for x in ids)
    for L in lengths:
        row = {}
        for name, model in (("dense", dense), ("mod", mod)):
            st = M.RoutingStats() if name == "mod" else None
            with _bar(cfg, n_tok, f"{name} {label}ppl @{L}") as bar:
                r = M.perplexity(model, ids, L, st, bar)
            row[name] = {"ppl": r.ppl, "loss": r.loss, "tokens": r.tokens, "windows": r.windows}
            if st is not None:
                stats[L] = st
                row["mod"]["rate"] = st.mean_rate()
                routing[str(L)] = st.to_dict()
        ppl[str(L)] = row
    return ppl, routing, stats


def _unseen(cfg: EvalConfig, recipe, tok, dense, mod, lengths) -> dict:
    """Perplexity, realised rates and one prefill's KV bytes on the recipe's unseen-domain documents (rates do
    not carry over from the training text: they are measured on this text)."""
    docs, _ = load_eval_docs(recipe, tok, cfg.max_docs, 0, cfg.max_tokens, domain="unseen")
    ids = [d.ids for d in docs]
    out = {"docs_unseen": [{"title": d.title, "source": d.source, "tokens": len(d.ids), "full_tokens": d.full_tokens}
                           for d in docs]}
    out["ppl_unseen"], out["routing_unseen"], _ = _ppl_rows(cfg, dense, mod, ids, lengths, "unseen ")
    longest = max(range(len(ids)), key=lambda k: len(ids[k]))
    pre = torch.tensor(ids[longest][:min(cfg.prefill_tokens or lengths[-1], len(ids[longest]))])[None]
    out["prefill_unseen"] = {"dense": M.prefill(dense, pre), "mod": M.prefill(mod, pre)}
    return out, ids


def _adaptivity(res: dict, mod, length: int) -> dict:
    """{'in_domain', 'unseen'}: adaptivity() of the realised rates per routed layer at `length` (None without
    unseen text), with the KV fraction for the model's skipped_kv mode and off layers."""
    mc = mod.mod_config
    off = {j for j in mod.routed_layers if mc.is_off(j)}
    return {name: A.adaptivity({int(j): v["rate"] for j, v in res[key][str(length)].items()}, mc.skipped_kv,
                               mod.config.num_hidden_layers, off=off) if res.get(key) else None
            for name, key in (("in_domain", "routing"), ("unseen", "routing_unseen"))}


def adaptivity_section(res: dict) -> list[str]:
    """Markdown of how token-adaptive the routing of a run_eval result is, unseen-domain text first."""
    ads = res.get("adaptivity") or {}
    sinks = res["mod_config"].get("sink_tokens", 0)
    L = ["\n## How token-adaptive is the routing\n",
         "A routed layer that runs (nearly) every token or (nearly) none is a kept or a deleted layer: with no "
         "layer in between the model is static depth pruning. Realised rates at the longest context"
         + (f"; the first {sinks} tokens of every document (sink_tokens) run every routed layer and count in them."
            if sinks else ".")]
    for name, label in (("unseen", "Unseen-domain text"), ("in_domain", "In-domain text")):
        if ads.get(name):
            L += A.section(ads[name], label)
            fig = res["figures"][f"adaptivity_{name}"]
            L.append(f"\n![routed layers per execution rate, {label.lower()}]({fig})\n")
    return L


def _pruning_baseline(cfg: EvalConfig, res: dict, dense, mod, lengths, ids, unseen_ids, cal_docs) -> None:
    """Static depth pruning at matched compute, evaluated on the same text: delete the dense model's layers of
    lowest block influence (measured on the calibration documents), as many as the MoD model skips
    (n_routed * (1 - realised rate), the rate on unseen text when there is some, at the longest length)."""
    import copy

    from mod_train.mod.prune import block_influence, lowest_influence, matched_layers, prune_layers
    key = "ppl_unseen" if unseen_ids else "ppl"
    rate = res[key][str(lengths[-1])]["mod"]["rate"]
    n = matched_layers(len(mod.routed_layers), rate)
    mc = mod.mod_config
    bi = block_influence(dense, calibration_batches(cal_docs, min(lengths[-1], cfg.calib_tokens)))
    drop = lowest_influence(bi, n, keep_first=mc.dense_first, keep_last=mc.dense_last)
    pruned = prune_layers(copy.deepcopy(dense), drop).eval()
    res["pruning"] = {"layers_deleted": drop, "count": n, "matched_rate": rate, "matched_on": key,
                      "kv_fraction": pruned.config.num_hidden_layers / dense.config.num_hidden_layers}
    for name, docs in (("ppl", ids), ("ppl_unseen", unseen_ids)):
        if not docs:
            continue
        for L in lengths:
            with _bar(cfg, sum(len(x) for x in docs), f"pruned ppl @{L}") as bar:
                r = M.perplexity(pruned, docs, L, None, bar)
            res[name][str(L)]["pruned"] = {"ppl": r.ppl, "loss": r.loss, "tokens": r.tokens, "windows": r.windows}
    del pruned


def _task_manager(cfg: EvalConfig, recipe, out: Path):
    """lm-eval's task index with the requested local tasks written under <out>/lm_eval_tasks; unknown names are
    refused here, before any model is loaded."""
    from mod_train.eval.lm_harness import check_tasks, task_manager
    from mod_train.eval.local_tasks import LOCAL_TASKS, write_local_tasks
    local = [t for t in cfg.tasks if t in LOCAL_TASKS]
    path = write_local_tasks(recipe, out / "lm_eval_tasks", local, cfg.task_examples, cfg.seed) if local else None
    tm = task_manager(path, cfg.tasks)
    check_tasks(cfg.tasks, tm)
    return tm


def _field_benchmarks(cfg: EvalConfig, recipe, tok, dense, mod, docs, tasks, out: Path) -> dict:
    """What the field reports besides perplexity, each part only when asked: lm-eval tasks, retrieval, samples
    (with the seconds each took, so a budget can be sized)."""
    res, seconds = {}, {}
    if tasks is not None:
        from mod_train.eval import lm_harness
        t0 = time.time()
        res["lm_eval"] = lm_harness.compare(dense, mod, tok, cfg.tasks, tasks, cfg.task_limit)
        seconds["lm_eval"] = time.time() - t0
    if cfg.passkey or cfg.needle:
        t0 = time.time()
        res["retrieval"] = _retrieval(cfg, recipe, tok, dense, mod, out)
        seconds["retrieval"] = time.time() - t0
    if cfg.samples:
        from mod_train.eval.samples import side_by_side
        t0 = time.time()
        res["samples"] = side_by_side({"dense": dense, "mod": mod}, tok, docs, cfg.samples, cfg.sample_prompt_tokens,
                                      cfg.sample_new_tokens)
        seconds["samples"] = time.time() - t0
    if seconds:
        res["field_seconds"] = seconds
    return res


def _retrieval(cfg: EvalConfig, recipe, tok, dense, mod, out: Path) -> dict:
    """Passkey and/or key-value retrieval on both models over the held-out documents as haystack."""
    from mod_train.data import heldout_documents
    from mod_train.eval import retrieval as R
    tasks = _retrieval_tasks(cfg)
    hay = R.haystack_ids(tok, heldout_documents(recipe, max_docs=max(cfg.max_docs or 4, 4)))
    results = R.evaluate({"dense": dense, "mod": mod}, tok, hay, tasks, sorted(cfg.retrieval_lengths),
                         cfg.retrieval_depths, cfg.retrieval_trials, cfg.seed, cfg.retrieval_distractors, cfg.progress)
    return {"results": results, "figures": R.heatmaps(results, out)}


def _retrieval_tasks(cfg: EvalConfig) -> list[str]:
    return [t for t, on in (("passkey", cfg.passkey), ("kv", cfg.needle)) if on]


def field_sections(res: dict) -> list[str]:
    """Markdown of the lm-eval, retrieval and samples parts of a run_eval result (empty for parts not run)."""
    L = []
    if res.get("lm_eval"):
        from mod_train.eval.lm_harness import table
        L.append("\n## lm-evaluation-harness, dense vs MoD\n")
        L.append("Local tasks are built from held-out text (mod_train/eval/local_tasks.py): mod_lastword predicts a "
                 "passage's next word that already occurred in it (acc: it is the greedy continuation), mod_choice "
                 "picks a passage's true continuation among 4 pieces of the same document; *_unseen on the "
                 "unseen-domain sources. Realised rate: the MoD model's execution rate over the task's tokens.\n")
        L += table(res["lm_eval"])
    if res.get("retrieval"):
        from mod_train.eval.retrieval import table
        r = res["retrieval"]
        L.append("\n## Long-context retrieval, dense vs MoD\n")
        L.append("Greedy exact match of the needle's value (passkey: 'The pass key is N'; kv: one key's magic number "
                 "among distractor keys) hidden at each depth of held-out text; the MoD columns give the routed "
                 "layers' execution rate at the needle sentence, at its value tokens and over the whole probe.\n")
        L += table(r["results"])
        L += [""] + [f"![retrieval accuracy, {name}]({f})" for name, f in r["figures"].items()]
    if res.get("samples"):
        from mod_train.eval.samples import markdown
        L.append("\n## Samples: greedy continuations of held-out prompts\n")
        L += markdown(res["samples"], {"dense": "dense", "mod": "MoD"})
    return L


def mod_calibrate(model, batches, target: float) -> dict:
    """calibrate_thresholds in the model's own target_scope (per layer, or one budget over all routed layers),
    except target 1.0 = every token runs on any text (p at the smallest valid threshold; the calibration text's
    smallest gate need not bound the evaluated text's gates)."""
    from mod_train import calibrate_thresholds
    if target >= 1.0:  # off layers and the rate hold included: the adapted dense model
        th = {j: 1e-12 for j in model.routed_layers}
        model.set_mod_config(dataclasses.replace(model.mod_config, layer_thresholds=th, rate_hold="off"))
        return th
    return calibrate_thresholds(model, batches, target, scope=model.mod_config.target_scope)


def ppl_table(res: dict, key: str = "ppl") -> list[str]:
    """Markdown rows of the dense-vs-MoD perplexity table of a run_eval result (also the main job's);
    key 'ppl_unseen' for the unseen-domain documents. With the static-pruning baseline, its columns too."""
    pruned = "pruned" in next(iter(res[key].values()))
    head = ["context", "dense ppl", "MoD ppl", "MoD / dense", "MoD execution rate"]
    if pruned:
        head += [f"static pruning ppl ({res['pruning']['count']} layers deleted)", "pruned / dense"]
    L = ["| " + " | ".join(head + ["windows", "predicted tokens"]) + " |", "|" + "---:|" * (len(head) + 2)]
    for n in sorted(int(k) for k in res[key]):
        r = res[key][str(n)]
        d = r["dense"]["ppl"]
        cells = [n, f"{d:.3f}", f"{r['mod']['ppl']:.3f}", f"{r['mod']['ppl'] / d:.3f}", f"{r['mod']['rate']:.3f}"]
        if pruned:
            cells += [f"{r['pruned']['ppl']:.3f}", f"{r['pruned']['ppl'] / d:.3f}"]
        L.append("| " + " | ".join(map(str, cells + [r["dense"]["windows"], r["dense"]["tokens"]])) + " |")
    return L


def render(res: dict, stats_by_len: dict) -> str:
    c = res["config"]
    lengths = sorted(int(k) for k in res["ppl"])
    L = []
    L.append("# MoD evaluation report\n")
    L.append(f"- dense model: `{c['dense']}`")
    L.append(f"- MoD model: `{c['mod'] or '(untrained conversion of the dense model)'}`"
             + ("" if c["mod"] else f" with overrides `{json.dumps(c['mod_overrides'])}`"))
    mc = res["mod_config"]
    L.append(f"- routing: {mc['routing']}, routed layers {res['routed_layers']} of {res['num_layers']}, "
             f"gate {mc['gate']}, threshold p={mc['threshold']}" + (f", capacity {mc['capacity']}" if mc['routing'] == 'topk' else ""))
    L.append(f"- recipe: `{c['recipe']}`; {len(res['docs'])} held-out documents evaluated "
             f"({sum(d['tokens'] for d in res['docs'])} tokens), "
             f"calibration on {len(res['calibration_docs'])} other documents")
    L.append(f"- wall time: {res['seconds']:.0f} s\n")
    L.append("## Held-out documents\n")
    L.append("| document | source | tokens evaluated | tokens in document |")
    L.append("|---|---|---:|---:|")
    for d in res["docs"]:
        L.append(f"| {d['title']} | {d['source']} | {d['tokens']} | {d['full_tokens']} |")
    L.append("\n## Perplexity\n")
    L.append("Non-overlapping windows of each context length, token-weighted over all documents.\n")
    L += ppl_table(res)
    L += unseen_section(res)
    L.append("\n## Routing per layer\n")
    L.append(f"Execution rate (share of tokens that ran the layer) per context length; mean gate, share of gates "
             f"within {M.NEAR_P} of p and threshold p at context {lengths[-1]}.\n")
    L.append("| layer | " + " | ".join(f"rate @{n}" for n in lengths) + " | mean gate | near p | p |")
    L.append("|---:|" + "---:|" * (len(lengths) + 3))
    last = stats_by_len[lengths[-1]]
    for j in sorted(last.layers):
        s = last.layers[j]
        L.append(f"| {j} | " + " | ".join(f"{stats_by_len[n].layers[j].rate:.3f}" for n in lengths)
                 + f" | {s.mean_gate:.3f} | {s.frac_near_p:.3f} | {s.threshold:.3f} |")
    L.append(f"\n![execution rate per layer]({res['figures']['rate']})\n")
    if "map" in res["figures"]:
        L.append(f"![routing map]({res['figures']['map']})\n")
    L.append(f"![gate histogram]({res['figures']['hist']})\n")
    L += adaptivity_section(res)
    p = res["prefill"]
    L.append("## KV cache and prefill\n")
    L.append(f"One prefill of {p['dense']['tokens']} tokens of '{res['docs'][0]['title']}' (best of 2).\n")
    L.append("| model | KV bytes | KV / dense | prefill s | speed-up |")
    L.append("|---|---:|---:|---:|---:|")
    L.append(f"| dense | {_fmt_bytes(p['dense']['kv_bytes'])} | 1.000 | {p['dense']['seconds']:.3f} | 1.00 |")
    L.append(f"| MoD | {_fmt_bytes(p['mod']['kv_bytes'])} | {p['mod']['kv_bytes'] / max(p['dense']['kv_bytes'], 1):.3f} "
             f"| {p['mod']['seconds']:.3f} | {p['dense']['seconds'] / p['mod']['seconds']:.2f} |")
    sw = res["sweep"]
    if sw["points"]:
        L.append("\n## Quality against KV memory (post-hoc calibrated thresholds)\n")
        L.append(f"Per-layer thresholds calibrated on the calibration documents for each target rate; perplexity at "
                 f"context {sw['length']} (dense: {sw['dense_ppl']:.3f}). Ideal KV = 1 - rho (1 - r) with rho = "
                 f"{len(res['routed_layers'])}/{res['num_layers']}; measured = MoDCache bytes / dense cache bytes "
                 f"on the prefill above.\n")
        L.append("| target rate | realised rate | ppl | ppl / dense | KV ideal | KV measured |")
        L.append("|---:|---:|---:|---:|---:|---:|")
        for q in sw["points"]:
            L.append(f"| {q['target']} | {q['rate']:.3f} | {q['ppl']:.3f} | {q['ppl'] / sw['dense_ppl']:.3f} "
                     f"| {q['kv_ideal']:.3f} | {q['kv_measured']:.3f} |")
        if any(q["target"] < 1 and q["rate"] > q["target"] + 0.1 for q in sw["points"]):
            L.append("\nNote: some realised rates stay far above their target: the gates are (nearly) equal across "
                     "tokens (e.g. an untrained router_init='dense' conversion), so a threshold cannot split them.")
        L.append(f"\n![quality against KV memory]({res['figures']['sweep']})\n")
    elif res["mod_config"]["routing"] != "threshold":
        L.append("\n(No calibration sweep: post-hoc threshold calibration applies to threshold routing only.)\n")
    L += field_sections(res)
    return "\n".join(L) + "\n"


def unseen_section(res: dict) -> list[str]:
    """The unseen-domain perplexity table and KV line of a run_eval result (empty without unseen text)."""
    if not res.get("ppl_unseen"):
        why = res.get("unseen_missing") or "the recipe has no heldout.unseen sources, or EvalConfig.unseen is off"
        return [f"\n(no unseen-domain text: {why})"]
    srcs = sorted({d["source"] for d in res["docs_unseen"]})
    L = [f"\n## Perplexity on unseen domains ({', '.join(srcs)}: sources no training mixture contains)\n",
         f"{len(res['docs_unseen'])} documents, {sum(d['tokens'] for d in res['docs_unseen'])} tokens; execution "
         "rates measured on this text.\n"]
    L += ppl_table(res, "ppl_unseen")
    pre = res["prefill_unseen"]
    kv_d, kv_m = pre["dense"]["kv_bytes"], pre["mod"]["kv_bytes"]
    L.append(f"\nKV cache of one {pre['mod'].get('tokens')}-token prefill of unseen text: dense "
             f"{kv_d / 2**20:.1f} MiB, MoD {kv_m / 2**20:.1f} MiB ({kv_d / max(kv_m, 1):.2f}x smaller)")
    if (res.get("adaptivity") or {}).get("unseen"):
        L.append(f"\nRouting on this text: {A.summary(res['adaptivity']['unseen'])}")
    return L
