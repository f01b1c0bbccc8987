"""Efficiency benchmark: the dense original against its MoD version, measured side by side in one run.

For every context length: prefill latency, per-token decode latency after that prefill, KV-cache bytes
and peak memory (process RSS growth on CPU, `torch.cuda.max_memory_allocated` on GPU); optionally
forward+backward (training step) time. Each MoD row is a calibrated target rate (thresholds set by
`calibrate_thresholds` on separate calibration text), and sits beside the ideal ratio from counting
(mod_train/eval/flops.py). Dense and MoD runs alternate inside each repeat, and the best of the
repeats is kept, so slow drifts of a shared machine hit both alike.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from mod_train.eval import flops as F


@dataclass
class BenchConfig:
    dense: str | None = None
    """Dense HF model dir or hub id (default: the offline SmolLM2-135M)."""
    mod: str | None = None
    """Saved MoD model dir; default: convert `dense` with random router directions (latency depends only on
    how many tokens run, which calibration fixes)."""
    lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192])
    """Context lengths (prefill sizes)."""
    rates: list[float] = field(default_factory=lambda: [0.5, 0.25, 0.125])
    """Target execution rates the MoD thresholds are calibrated to."""
    decode_tokens: int = 8
    """Decode steps timed after each prefill (0 disables decode)."""
    repeats: int = 2
    """Timed repetitions; the best is reported."""
    train_lengths: list[int] = field(default_factory=list)
    """Lengths at which forward+backward time is also measured (e.g. [2048, 8192])."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Model dtype: float32 or bfloat16."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """'auto' (cuda if available), 'cpu' or 'cuda'."""
    out: str = "runs/bench"
    """Output dir for bench.json and bench.png."""
    seed: int = 0
    """Seed of the random router directions."""
    serve: bool = False
    """Serving benchmark instead of the latency table (`serve` below): decode tokens/s at batch 1 and at the largest
    batch that fits `serve_memory_gb`, and how many sequences of each length fit, dense vs MoD per rate."""
    serve_memory_gb: float | None = None
    """Memory for KV caches and one prefill's working set; None: free CUDA memory after loading, 4 GiB on CPU."""
    serve_max_batch: int = 64
    """Largest batch actually timed (the count of sequences that fit is reported beyond it)."""
    mod_settings: dict[str, Any] = field(default_factory=dict)
    """MoDConfig fields of the MoD model, e.g. {"skipped_kv": "keep", "sink_tokens": 1} (the main job's kind of
    model): the random-router model is built with them; a saved `mod` model takes them over its own settings."""
    mask_elems: int | None = None
    """Largest attention mask built whole (mod.attention.MASK_ELEMS, 16M); larger ones are taken in blocks of
    queries. A huge value measures the whole-mask path for comparison."""
    decode: Literal["eager", "static", "cuda_graphs"] = "eager"
    """How decode steps run (MoDConfig.decode). Not 'eager': the dense baseline is the MoD model with routing off,
    decoded by the same static pieces (and CUDA graphs), so both pay the same per-step overhead."""
    profile: bool = False
    """Also profile one more prefill per length (dense and each rate) with the torch profiler: device-busy time
    against wall time, host syncs, launches and the top ops, to find where a prefill loses to its FLOP ideal."""
    memory: bool = True
    """On CPU, measure peak RSS growth in a fresh process per configuration (one extra prefill each); false: the
    peak-memory ratio is n/a (null in bench.json), since RSS growth inside the warm benchmark process means nothing."""


class PeakMemory:
    """Peak memory growth over a block: CUDA allocator peak, or process RSS high-water mark (Linux).
    On CPU the allocator keeps freed memory resident, so RSS growth is only meaningful in a fresh
    process: run_bench measures CPU memory in a spawned child per configuration (`_memory_child`)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            try:  # reset VmHWM to the current RSS
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
            self.base = _proc_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.peak = max(_proc_kb("VmHWM") * 1024 - self.base, 0)


def _proc_kb(key: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def real_token_ids(tokenizer, n: int, skip: int = 0) -> torch.Tensor:
    """n tokens of real text: CPython's own stdlib sources (present on every machine)."""
    import sysconfig
    root = Path(sysconfig.get_paths()["stdlib"])
    ids: list[int] = []
    for path in sorted(root.glob("*.py")):
        ids += tokenizer(path.read_text(errors="ignore")).input_ids
        if len(ids) >= n + skip:
            break
    return torch.tensor(ids[skip:skip + n])[None]


class RoutingOff:
    """The dense baseline of a non-eager decode benchmark: the MoD model called with routing off (every layer
    dense, a dense MoDCache), so it decodes through the same static step and graphs as the MoD rows."""

    def __init__(self, mod):
        self.mod, self.config = mod, mod.config

    def __call__(self, **kw):
        with self.mod.routing_disabled():
            return self.mod(**kw)

    def __getattr__(self, name):  # train(), eval(), zero_grad(): the model's own
        return getattr(self.mod, name)


def _new_cache(model, is_mod, max_length=None):
    """A fresh MoDCache for the MoD model or its routing-off baseline; None for the HF dense model (its own cache)."""
    from mod_train import MoDCache
    if is_mod or isinstance(model, RoutingOff):
        return MoDCache(model.config.num_hidden_layers, max_length=max_length)
    return None


@torch.no_grad()
def _prefill(model, ids, device, is_mod, n_decode: int = 0):
    """One timed prefill with a fresh cache sized for `n_decode` more tokens (what generate() does; the static
    decode step allocates once): (output, seconds, peak memory growth)."""
    cache = _new_cache(model, is_mod, ids.shape[1] + n_decode + WARM_STEPS)
    with PeakMemory(device) as mem:
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        _sync(device)
    return out, time.perf_counter() - t0, mem.peak


@torch.no_grad()
def _prefill_decode(model, ids, n_decode, device, is_mod):
    from mod_train import kv_cache_bytes
    out, prefill, peak = _prefill(model, ids, device, is_mod, n_decode)
    kv = kv_cache_bytes(out.cache)["total"]
    rates = {i: v["rate"].item() for i, v in out.routing.items()} if is_mod else {}
    decode = None
    if n_decode:
        decode = _decode_loop(model, out.logits[:, -1:].argmax(-1), out.cache, n_decode, device)[0] / n_decode
    return dict(prefill_s=prefill, decode_s=decode, kv_bytes=kv, peak_bytes=peak, rates=rates)


def _memory_child(dense_path, mod_path, dtype, mod_state, ids, n_decode, queue, mask_elems):
    """Fresh process: load the model, one prefill + decode, report the RSS growth."""
    import mod_train
    from mod_train.mod import attention
    from transformers import AutoModelForCausalLM
    attention.MASK_ELEMS = mask_elems
    dt = getattr(torch, dtype)
    if mod_state is None:
        model = AutoModelForCausalLM.from_pretrained(dense_path, dtype=dt)
    elif mod_path:
        model = mod_train.from_pretrained_mod(mod_path, dtype=dt)
    else:
        model = mod_train.modify(AutoModelForCausalLM.from_pretrained(dense_path, dtype=dt), mod_state[0])
    if mod_state is not None:
        model.load_state_dict(mod_state[1], strict=False)
        model.set_mod_config(mod_state[0])
    res = _prefill_decode(model.eval(), ids, n_decode, torch.device("cpu"), mod_state is not None)
    queue.put(res["peak_bytes"])


def _cpu_peak(dense_path, mod_path, dtype, mod, ids, n_decode) -> int:
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    state = None
    if mod is not None:
        state = (mod.mod_config, {k: v.detach().clone() for k, v in mod.state_dict().items() if "router" in k})
    from mod_train.mod import attention
    p = ctx.Process(target=_memory_child, args=(dense_path, mod_path, dtype, state, ids.cpu(), n_decode, q,
                                                attention.MASK_ELEMS))
    p.start()
    peak = q.get()
    p.join()
    return peak


def _train_step(model, ids, device):
    model.train()
    model.zero_grad(set_to_none=True)
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    _sync(device)
    model.zero_grad(set_to_none=True)
    model.eval()
    return time.perf_counter() - t0


def run_bench(cfg: BenchConfig, progress=True) -> dict:
    """The benchmark (or with cfg.serve the serving rows); checks the settings before any model loads."""
    import mod_train
    from mod_train.mod import attention

    if "decode" in cfg.mod_settings:
        raise ValueError("mod_settings.decode: set how decode runs with --decode (it applies to the dense row too)")
    settings = mod_train.MoDConfig.from_dict(cfg.mod_settings)  # a bad key or value fails before any model loads
    settings.validate()
    if cfg.mask_elems is not None and cfg.mask_elems < 1:
        raise ValueError(f"mask_elems = {cfg.mask_elems}: give a positive number of mask elements (default 16M)")
    before = attention.MASK_ELEMS
    attention.MASK_ELEMS = cfg.mask_elems or before
    try:
        return _run_bench(cfg, settings, progress)
    finally:
        attention.MASK_ELEMS = before


def _run_bench(cfg: BenchConfig, settings, progress: bool) -> dict:
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import mod_train
    from mod_train.offline import smollm2_path
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    dtype = getattr(torch, cfg.dtype)
    dense_path = cfg.dense or str(smollm2_path())
    tok = AutoTokenizer.from_pretrained(dense_path)
    dense = AutoModelForCausalLM.from_pretrained(dense_path, dtype=dtype).to(device).eval()
    if cfg.mod:
        mod = mod_train.from_pretrained_mod(cfg.mod, dtype=dtype).to(device).eval()
        mod.set_mod_config(replace(mod.mod_config, **cfg.mod_settings))
    else:
        mod = mod_train.random_routers(mod_train.modify(copy.deepcopy(dense), settings).eval(), seed=cfg.seed)
    mod.set_mod_config(replace(mod.mod_config, decode=cfg.decode))
    if cfg.decode != "eager":
        dense = RoutingOff(mod)
    max_len = max(cfg.lengths + list(cfg.train_lengths))
    ids_all = real_token_ids(tok, max_len).to(device)
    # thresholds are calibrated on the longest benchmark input (up to 8k tokens): latency depends only on
    # how many tokens run, and this makes the realised rate at long context match the target
    calib = ids_all[:, :min(max_len, 8192)]

    # thresholds per target rate, calibrated once on the calibration text
    thresholds = {}
    for rate in cfg.rates:
        thresholds[rate] = mod_train.calibrate_thresholds(mod, [{"input_ids": calib}], rate)

    def use(rate):
        mod.set_mod_config(replace(mod.mod_config, layer_thresholds=thresholds[rate]))

    results = {"config": asdict(cfg), "device": str(device), "model": dense_path, "rows": [], "train": []}
    if cfg.serve:
        results["serve"] = run_serve(cfg, dense, mod, ids_all, use, device, progress)
        return _write(cfg, results)
    n_jobs = len(cfg.lengths) * (1 + len(cfg.rates)) + len(cfg.train_lengths) * (1 + len(cfg.rates))
    bar = tqdm(total=n_jobs * cfg.repeats, disable=not progress, desc="bench")
    for L in cfg.lengths:
        ids = ids_all[:, :L]
        best_d, best_m = None, {}
        for _ in range(cfg.repeats):  # dense and MoD alternate inside each repeat
            best_d = _best(best_d, _prefill_decode(dense, ids, cfg.decode_tokens, device, False))
            bar.update(1)
            for rate in cfg.rates:
                use(rate)
                best_m[rate] = _best(best_m.get(rate), _prefill_decode(mod, ids, cfg.decode_tokens, device, True))
                bar.update(1)
        if cfg.profile:
            best_d["profile"] = prefill_profile(dense, ids, device, False)
            for rate in cfg.rates:
                use(rate)
                best_m[rate]["profile"] = prefill_profile(mod, ids, device, True)
        if device.type == "cpu" and cfg.memory:
            best_d["peak_bytes"] = _cpu_peak(dense_path, None, cfg.dtype, None, ids, cfg.decode_tokens)
            for rate in cfg.rates:
                use(rate)
                best_m[rate]["peak_bytes"] = _cpu_peak(dense_path, cfg.mod, cfg.dtype, mod, ids, cfg.decode_tokens)
        if device.type == "cpu" and not cfg.memory:  # RSS growth inside this warm process means nothing
            for m in (best_d, *best_m.values()):
                m["peak_bytes"] = None
        results["rows"] += [_row(dense.config, L, rate, best_d, best_m[rate], F.keep_layers(mod)) for rate in cfg.rates]
    for L in cfg.train_lengths:
        ids = ids_all[:, :L]
        td, tm = float("inf"), {}
        for _ in range(cfg.repeats):
            td = min(td, _train_step(dense, ids, device))
            bar.update(1)
            for rate in cfg.rates:
                use(rate)
                tm[rate] = min(tm.get(rate, float("inf")), _train_step(mod, ids, device))
                bar.update(1)
        for rate in cfg.rates:
            use(rate)
            with torch.no_grad():
                rates = {i: v["rate"].item() for i, v in mod(input_ids=ids).routing.items()}
            ideal = F.prefill_flops(dense.config, L, None, L) / F.prefill_flops(dense.config, L, rates, L,
                                                                                 F.keep_layers(mod))
            results["train"].append(dict(length=L, target_rate=rate, realised_rate=_mean(rates), dense_s=td,
                                         mod_s=tm[rate], speedup=td / tm[rate], ideal_speedup=ideal,
                                         measured_over_ideal=(td / tm[rate]) / ideal))
    bar.close()
    return _write(cfg, results)


def _write(cfg: BenchConfig, results: dict) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2))
    if results["rows"]:
        plot(results, out / "bench.png")
    return results


WARM_STEPS = 2
"""Untimed decode steps before a non-eager decode is timed: the static state is built at the first and CUDA graphs
are warmed up there and captured at the second, once per server lifetime (MoDCache.reset() keeps them), not per
token. Eager decoding is timed from its first step, as before."""


def _decode_loop(model, tok, cache, n, device) -> tuple[float, torch.Tensor]:
    """n greedy decode steps from tokens tok [B, 1] on `cache` (after WARM_STEPS untimed ones when the decode is not
    eager); (seconds, last tokens)."""
    warm = WARM_STEPS if getattr(model, "mod_config", None) is not None and model.mod_config.decode != "eager" else 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(warm + n):
            if i == warm:
                _sync(device)
                t0 = time.perf_counter()
            out = model(input_ids=tok, cache=cache, use_cache=True, logits_to_keep=1)
            tok = out.logits[:, -1:].argmax(-1)
    _sync(device)
    return time.perf_counter() - t0, tok


def serve_one(model, ids, n_decode: int, budget: int, max_batch: int, device, is_mod: bool) -> dict:
    """One model at one context length: prefill ids [1, L] (timed, its working set measured on CUDA), decode at
    batch 1, then at the largest batch whose KV caches fit `budget` bytes beside one prefill's working set (up to
    `max_batch`). The batch shares the prefilled context (the cache repeated per row) and starts from each row's own
    next token (the prefill's top-B candidates), so the routed layers' decisions differ between rows as in serving."""
    from mod_train import MoDCache, kv_cache_bytes
    out, prefill, peak = _prefill(model, ids, device, is_mod, n_decode)
    cache = out.cache
    kv = kv_cache_bytes(cache)["total"]
    per_seq = kv * (ids.shape[1] + n_decode) / ids.shape[1]
    work = peak - kv if device.type == "cuda" else 0
    fit = int(max(budget - max(work, 0), 0) // max(per_seq, 1))
    rates = {i: v["rate"].item() for i, v in out.routing.items()} if is_mod else {}
    batch = max(1, min(fit, max_batch))
    cand = out.logits[0, -1].topk(batch).indices[:, None]
    c1 = copy.deepcopy(cache)
    if isinstance(c1, MoDCache):
        c1.max_length += 1  # room for the profiled step
    s1, t1 = _decode_loop(model, cand[:1], c1, n_decode, device)
    prof = step_profile(model, t1, c1, device)
    cache.reorder_cache(torch.zeros(batch, dtype=torch.long, device=ids.device))
    sb, _ = _decode_loop(model, cand, cache, n_decode, device)
    return dict(prefill_s=prefill, kv_bytes_per_seq=per_seq, prefill_work_bytes=work, fit_seqs=fit, batch=batch,
                tok_s_b1=n_decode / s1, tok_s_batch=batch * n_decode / sb, rates=rates, **prof)


SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero")  # .item() / int() / bool() of a tensor, nonzero
LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch")
NO_KERNEL = frozenset(f"aten::{n}" for n in (  # metadata and allocation only: no kernel on a GPU
    "view", "reshape", "_reshape_alias", "as_strided", "empty", "empty_strided", "empty_like", "t", "transpose",
    "unsqueeze", "squeeze", "expand", "expand_as", "slice", "select", "_unsafe_view", "permute", "alias", "detach",
    "resolve_conj", "resolve_neg", "lift_fresh", "split", "chunk", "unbind", "narrow", "unfold", "view_as",
    "result_type", "is_nonzero", "size", "stride", "dim", "numel", "item", "_local_scalar_dense", "to", "resize_",
    "scalar_tensor"))


def step_profile(model, tok, cache, device) -> dict:
    """One more decode step under the torch profiler: host syncs, and host-side launches (CUDA: kernel and graph
    launches; CPU: aten ops that compute and call no other computing op, each about one kernel on a GPU)."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad(), profile(activities=acts) as prof:
        model(input_ids=tok, cache=cache, use_cache=True, logits_to_keep=1)
        _sync(device)
    ev = prof.events()
    return dict(syncs_step=_syncs(ev), launches_step=_launches(ev, device.type == "cuda"))


def _syncs(ev) -> int:
    return sum(1 for e in ev if e.name in SYNC_OPS)


def _launches(ev, cuda: bool) -> int:
    """Host-side launches among profiler events: CUDA kernel and graph launches; on CPU, the aten ops that compute
    and call no other computing op (each about one kernel on a GPU)."""
    if cuda:
        return sum(1 for e in ev if e.name in LAUNCHES)
    return sum(1 for e in ev if e.name.startswith("aten::") and e.name not in NO_KERNEL
               and all(c.name in NO_KERNEL or not c.name.startswith("aten::") for c in e.cpu_children))


def prefill_profile(model, ids, device, is_mod, top: int = 6) -> dict:
    """One prefill under the torch profiler. `busy_ms`: the device's op time (CUDA: summed kernel time; CPU: summed
    self time of the computing ops), against `wall_ms`; `idle_share` = 1 - busy / wall is what the prefill spends on
    neither (launch overheads, host syncs, Python); plus syncs, launches and the `top` ops by that time."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    cache = _new_cache(model, is_mod)
    with torch.no_grad(), profile(activities=acts) as prof:
        _sync(device)
        t0 = time.perf_counter()
        model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        _sync(device)
        wall = time.perf_counter() - t0
    ev = prof.events()
    if cuda:
        def dev_us(e):
            return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        ops = [e for e in prof.key_averages() if dev_us(e) > 0]
    else:
        def dev_us(e):
            return e.self_cpu_time_total
        ops = [e for e in prof.key_averages() if e.key.startswith("aten::") and e.key not in NO_KERNEL]
    busy = sum(dev_us(e) for e in ops) / 1e3
    ops.sort(key=dev_us, reverse=True)
    return dict(wall_ms=1e3 * wall, busy_ms=busy, idle_share=max(0.0, 1 - busy / (1e3 * wall)),
                syncs=_syncs(ev), launches=_launches(ev, cuda),
                top=[(e.key, e.count, dev_us(e) / 1e3) for e in ops[:top]])


def profile_table(rows: list[dict]) -> str:
    """Markdown table of the prefill profiles of a bench run (BenchConfig.profile)."""
    lines = ["| ctx | model | wall ms | busy ms | idle share | syncs | launches | top ops (count, ms) |",
             "|" + "---|" * 8]
    dense_done = set()  # one dense row per length (every rate's row carries it)
    for r in rows:
        for name, p in (("dense", r.get("dense_profile")), (f"mod r {r['target_rate']}", r.get("mod_profile"))):
            if p is None or (name == "dense" and r["length"] in dense_done):
                continue
            if name == "dense":
                dense_done.add(r["length"])
            top = "; ".join(f"{k} ({c}, {t:.1f})" for k, c, t in p["top"][:3])
            lines.append(f"| {r['length']} | {name} | {p['wall_ms']:.1f} | {p['busy_ms']:.1f} | {p['idle_share']:.2f} | "
                         f"{p['syncs']} | {p['launches']} | {top} |")
    return "\n".join(lines)


def run_serve(cfg: BenchConfig, dense, mod, ids_all, use, device, progress=True) -> list[dict]:
    """The serving rows: per length, the dense model and the MoD model at each calibrated rate (see serve_one)."""
    from tqdm import tqdm
    budget = _serve_budget(cfg, device)
    rows = []
    bar = tqdm(total=len(cfg.lengths) * (1 + len(cfg.rates)), disable=not progress, desc="serve")
    for L in cfg.lengths:
        ids = ids_all[:, :L]
        d = serve_one(dense, ids, cfg.decode_tokens, budget, cfg.serve_max_batch, device, False)
        bar.update(1)
        rows.append(dict(length=L, model="dense", target_rate=1.0, realised_rate=1.0, budget_bytes=budget, **d))
        for rate in cfg.rates:
            use(rate)
            m = serve_one(mod, ids, cfg.decode_tokens, budget, cfg.serve_max_batch, device, True)
            bar.update(1)
            rows.append(dict(length=L, model="mod", target_rate=rate, realised_rate=_mean(m["rates"]),
                             budget_bytes=budget, fit_ratio=m["fit_seqs"] / max(d["fit_seqs"], 1),
                             speedup_b1=m["tok_s_b1"] / d["tok_s_b1"],
                             speedup_batch=m["tok_s_batch"] / d["tok_s_batch"], **m))
    bar.close()
    return rows


def _serve_budget(cfg: BenchConfig, device) -> int:
    """Bytes for KV caches and a prefill's working set: serve_memory_gb, or the free CUDA memory now (both models'
    weights are loaded; a server holds one, so this is conservative), or 4 GiB on CPU."""
    if cfg.serve_memory_gb is not None:
        return int(cfg.serve_memory_gb * 2**30)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.9)
    return 4 * 2**30


def serve_table(rows: list[dict]) -> str:
    """Markdown table of the serving rows."""
    lines = ["| ctx | model | target r | realised r | KV / seq MB | seqs that fit | x dense | tok/s batch 1 | x dense "
             "| batch timed | tok/s at batch | x dense | syncs / step | launches / step |", "|" + "---|" * 14]
    for r in rows:
        mod = r["model"] == "mod"
        lines.append(
            f"| {r['length']} | {r['model']} | {r['target_rate'] if mod else '-'} | {r['realised_rate']:.3f} | "
            f"{r['kv_bytes_per_seq'] / 2**20:.1f} | {r['fit_seqs']} | {format(r['fit_ratio'], '.2f') + 'x' if mod else '-'} | "
            f"{r['tok_s_b1']:.1f} | {format(r['speedup_b1'], '.2f') + 'x' if mod else '-'} | {r['batch']} | "
            f"{r['tok_s_batch']:.1f} | {format(r['speedup_batch'], '.2f') + 'x' if mod else '-'} | "
            f"{r.get('syncs_step', '-')} | {r.get('launches_step', '-')} |")
    return "\n".join(lines)


def _best(a, b):
    """Best of two measurements, per quantity (times and memory: minimum)."""
    if a is None:
        return b
    out = dict(b)
    for key in ("prefill_s", "decode_s", "peak_bytes"):
        if a[key] is not None:
            out[key] = min(a[key], b[key])
    return out


def _mean(rates: dict) -> float:
    return sum(rates.values()) / max(len(rates), 1)


def _row(config, L, rate, d, m, keep=frozenset()):
    row = dict(length=L, target_rate=rate, realised_rate=_mean(m["rates"]), dense_prefill_s=d["prefill_s"],
               mod_prefill_s=m["prefill_s"],
               dense_decode_s=d["decode_s"], mod_decode_s=m["decode_s"], dense_kv_bytes=d["kv_bytes"],
               mod_kv_bytes=m["kv_bytes"], dense_peak_bytes=d["peak_bytes"], mod_peak_bytes=m["peak_bytes"],
               ideal_prefill_speedup=F.prefill_flops(config, L) / F.prefill_flops(config, L, m["rates"], 1, keep),
               ideal_decode_speedup=F.decode_flops(config, L) / F.decode_flops(config, L, m["rates"], keep),
               ideal_kv_ratio=1 / F.kv_ratio(config, m["rates"], keep),
               dense_profile=d.get("profile"), mod_profile=m.get("profile"))
    row["prefill_speedup"] = d["prefill_s"] / row["mod_prefill_s"]
    row["prefill_measured_over_ideal"] = row["prefill_speedup"] / row["ideal_prefill_speedup"]
    if row["mod_decode_s"]:
        row["decode_speedup"] = d["decode_s"] / row["mod_decode_s"]
    row["kv_ratio"] = row["dense_kv_bytes"] / max(row["mod_kv_bytes"], 1)
    row["peak_ratio"] = (None if row["dense_peak_bytes"] is None or row["mod_peak_bytes"] is None else
                         row["dense_peak_bytes"] / max(row["mod_peak_bytes"], 1))
    return row


def table(results: dict) -> str:
    """Markdown table of a bench run."""
    if results.get("serve"):
        return serve_table(results["serve"])
    lines = ["| ctx | target r | realised r | prefill dense s | prefill MoD s | speedup | ideal | meas/ideal "
             "| decode dense ms | decode MoD ms | decode speedup | ideal | KV dense MB | KV MoD MB | KV ratio | ideal "
             "| peak mem ratio |", "|" + "---|" * 17]
    for r in results["rows"]:
        dec_d = f"{1e3 * r['dense_decode_s']:.1f}" if r["dense_decode_s"] else "-"
        dec_m = f"{1e3 * r['mod_decode_s']:.1f}" if r["mod_decode_s"] else "-"
        lines.append(
            f"| {r['length']} | {r['target_rate']} | {r['realised_rate']:.3f} | {r['dense_prefill_s']:.2f} | "
            f"{r['mod_prefill_s']:.2f} | {r['prefill_speedup']:.2f}x | {r['ideal_prefill_speedup']:.2f}x | "
            f"{r['prefill_measured_over_ideal']:.2f} | {dec_d} | {dec_m} | "
            f"{format(r['decode_speedup'], '.2f') + 'x' if 'decode_speedup' in r else '-'} | "
            f"{r['ideal_decode_speedup']:.2f}x | {r['dense_kv_bytes'] / 2**20:.1f} | {r['mod_kv_bytes'] / 2**20:.1f} | "
            f"{r['kv_ratio']:.2f}x | {r['ideal_kv_ratio']:.2f}x | "
            f"{'n/a' if r['peak_ratio'] is None else format(r['peak_ratio'], '.2f') + 'x'} |")
    if any(r.get("mod_profile") for r in results["rows"]):
        lines += ["", profile_table(results["rows"])]
    if results.get("train"):
        lines += ["", "| ctx | target r | realised r | fwd+bwd dense s | fwd+bwd MoD s | speedup | ideal | meas/ideal |",
                  "|" + "---|" * 8]
        for r in results["train"]:
            lines.append(f"| {r['length']} | {r['target_rate']} | {r['realised_rate']:.3f} | {r['dense_s']:.2f} | "
                         f"{r['mod_s']:.2f} | {r['speedup']:.2f}x | {r['ideal_speedup']:.2f}x | "
                         f"{r['measured_over_ideal']:.2f} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = results["rows"]
    rates = sorted({r["target_rate"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for rate in rates:
        rr = [r for r in rows if r["target_rate"] == rate]
        L = [r["length"] for r in rr]
        axes[0].plot(L, [r["prefill_speedup"] for r in rr], "o-", label=f"measured r={rate}")
        axes[0].plot(L, [r["ideal_prefill_speedup"] for r in rr], "x--", alpha=0.6, label=f"ideal r={rate}")
        axes[1].plot(L, [r.get("decode_speedup", 0) for r in rr], "o-", label=f"r={rate}")
        axes[2].plot(L, [r["kv_ratio"] for r in rr], "o-", label=f"measured r={rate}")
        axes[2].plot(L, [r["ideal_kv_ratio"] for r in rr], "x--", alpha=0.6, label=f"ideal r={rate}")
    for ax, title in zip(axes, ["prefill speedup (dense/MoD)", "decode speedup per token", "KV-cache reduction"]):
        ax.set_xscale("log", base=2)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("context tokens")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.suptitle(f"MoD vs dense, {results['model']} on {results['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
