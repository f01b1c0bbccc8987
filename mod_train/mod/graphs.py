"""Static-shape decoding and CUDA graphs (MoDConfig.decode 'static' / 'cuda_graphs').

Eager decoding of one token per row is launch-bound on a GPU: a few kernels per sub-module, each launched from
Python. A CUDA graph replays a recorded sequence of kernels with one launch, but only if every tensor it touches
keeps its shape and address from one step to the next. The static step is that form of a decode step:

- every layer's K/V live in the MoDCache's own buffers (`_LayerKV`), sized once for the whole generation
  (`MoDCache.max_length`, which `generate()` sets; grown in chunks otherwise), written at each row's device-side
  length with a scatter, and attention runs over a fixed span of the buffer under the validity mask (slots past a
  row's length are invalid): the layer's stored bound rounded up to a power of two, so no shape depends on how
  many tokens a row has stored, and a span changes log2(length) times per generation (each span has its captures);
- positions, the token's validity, the routing decision, the gate and the rate-hold history (a ring of the last
  rate_window - 1 logits per row) are device tensors, written in place;
- the host decides once per routed layer whether any row runs it (`flag`, one sync); rows that do not run it
  in a batch are computed and discarded (their output is their input, their K/V are not kept in 'drop' mode).

The step is split where the host decides: one piece for each run of consecutive dense layers (with the
embedding before the first, the head after the last, and the router of the routed layer that follows), one
for each routed layer's body, and one for a 'keep' layer's K/V when no row runs it. With 'cuda_graphs' each
piece is captured once per cache and per spans of the layers it attends (its first call runs eagerly on a side
stream as the warm-up, its second is captured and every later one replayed) in one memory pool shared by the pieces
(each piece writes its results only into buffers allocated outside the pool); the graphs are dropped and captured
again if a buffer moves (growth, beam reordering, another batch size). A server keeps one cache per batch
size (its batch-size buckets) and empties it with `MoDCache.reset()` between requests: the buffers stay where they
are, so the next request replays the graphs already captured (HF's StaticCache.reset() pattern); an eager call on
the cache (the next prefill) only marks the static state stale, and the next step re-reads the routing history.
If a piece cannot be captured on some setup (an op not allowed in a CUDA graph), the model decodes on as 'static'
and one line says so. On CPU 'cuda_graphs' decodes as 'static': the same pieces, called directly, which is how the
logic is tested without a GPU.

The static step equals the eager one (tests/test_static_decode.py): the same routing rule on the same logits,
the same K/V, attention over the same valid keys. What it changes is where the work is decided, not what is
computed, except that a batch computes a routed layer for every row when any row runs it.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from mod_train.mod import router as R
from mod_train.mod.layer import _gated, _kv, _qkv, _window, router_input

CHUNK = 256  # slots added per growth when the cache has no max_length


def on_cuda(model) -> bool:
    return torch.cuda.is_available() and model.lm_head.weight.is_cuda


def can_capture(model) -> bool:
    """CUDA graphs are possible: the model is on a CUDA device, and no capture has failed for it before."""
    return on_cuda(model) and getattr(model, "_mod_graph_error", None) is None


class StaticDecoder:
    """The static decode step of one model on one MoDCache (kept on the cache; see the module docstring)."""

    def __init__(self, model, cache, graphs: bool):
        self.model, self.cache, self.wanted = model, cache, bool(graphs)
        self.graphs = bool(graphs) and can_capture(model)
        self._key = None  # (routing off, batch, MoD settings, buffer addresses): what the state below is for
        self._plan_key = None  # (routing off, MoD settings): what self.plan is for
        self._g: dict = {}
        self._warm: set = set()
        self._pool = None
        self.stale = False  # an eager call (a prefill after MoDCache.reset()) ran since the last step
        self.spans: dict = {}  # slots attended per writing layer (see `_spans`): part of what a capture is for

    # -- state ----------------------------------------------------------------------------------------
    def _plan(self):
        """[('piece', name, [fns], [layers it attends])] and [('cond', layer)] in order: the host decides at each
        'cond'."""
        m, cfg = self.model, self.model.mod_config
        dense_only = m._routing_off
        plan, cur, name, attends = [], [self._embed], "embed", []
        self.routed, self.writers = [], []
        for i, layer in enumerate(m.model.layers):
            if dense_only or not hasattr(layer, "router"):
                cur.append(partial(self._dense, i))
                self.writers.append(i)
                attends.append(i)
                continue
            if cfg.routing == "threshold" and cfg.is_off(i):
                continue  # no token runs it, nothing is stored: not in the step at all
            cur.append(partial(self._decide, i))
            plan.append(("piece", name, cur, attends))
            plan.append(("cond", i))
            self.routed.append(i)
            self.writers.append(i)
            cur, name, attends = [], f"after{i}", []
        cur.append(self._head)
        plan.append(("piece", name, cur, attends))
        return plan

    def _prepare(self, B: int):
        """Make every buffer the step touches exist at a fixed address, with room for the next token."""
        m, cache, cfg = self.model, self.cache, self.model.mod_config
        if self._plan_key != (m._routing_off, cfg):  # the plan follows the settings, not the step
            self.plan, self._plan_key = self._plan(), (m._routing_off, cfg)
        p = m.lm_head.weight
        dev, dt = p.device, p.dtype
        attn = m.model.layers[0].self_attn
        Hkv = m.config.num_key_value_heads
        for i in self.writers:  # room for the rest of the generation (max_length), else a chunk more
            L = cache.layers[i]
            L.release_unfit(B, Hkv, attn.head_dim, dt, dev)  # a reset cache's empty layer of another request
            cap = 0 if L.k is None else L.k.shape[2]
            if L.bound + 1 <= cap:
                continue
            if L.k is None:
                L.length = torch.zeros(B, dtype=torch.long, device=dev)
            grow = max(cache.max_length - cache.seen, 1) if cache.max_length else max(CHUNK, cap // 8)
            L._grow(B, Hkv, attn.head_dim, max(L.bound + 1, cap + grow) if cap else L.bound + grow,
                    L.k if L.k is not None else torch.empty(0, dtype=dt, device=dev))
        # the settings are baked into captured kernels (thresholds, rates): a new MoDConfig is a new state
        key = (m._routing_off, B, cfg, tuple(getattr(cache.layers[i], n).data_ptr() for i in self.writers
                                             for n in ("k", "v", "pos", "valid", "length")))
        if key == self._key:  # the batch size is part of the key
            if self.stale:  # same buffers after an eager call: the captures hold; the history rings are refilled
                for i, ring in self.hist.items():
                    self._fill_ring(i, ring)
                self.stale = False
            return
        self._key, self._g, self._warm, self.stale = key, {}, set(), False
        d = m.config.hidden_size
        hd = attn.head_dim
        st = self.st = {
            "ids": torch.zeros(B, 1, dtype=torch.long, device=dev),
            "pos": torch.zeros(B, dtype=torch.long, device=dev),
            "ok": torch.ones(B, dtype=torch.bool, device=dev),
            "h": torch.zeros(B, 1, d, dtype=dt, device=dev),
            "cos": torch.zeros(B, 1, hd, dtype=dt, device=dev),
            "sin": torch.zeros(B, 1, hd, dtype=dt, device=dev),
            "logits": torch.zeros(B, 1, m.config.vocab_size, dtype=dt, device=dev),
        }
        self.sel, self.w, self.flag, self.z, self.hist = {}, {}, {}, {}, {}
        for i in self.routed:
            self.sel[i] = torch.zeros(B, dtype=torch.bool, device=dev)
            self.w[i] = torch.zeros(B, 1, dtype=torch.float32, device=dev)
            self.z[i] = torch.zeros(B, 1, dtype=torch.float32, device=dev)
            self.flag[i] = torch.zeros((), dtype=torch.bool, device=dev)
            if cfg.held_rate(i) is not None:  # the history ring
                W1, old = cfg.rate_window - 1, cache.route_history(i)
                zt = old.z.dtype if old is not None else dt
                self.hist[i] = R.History(torch.zeros(B, W1, dtype=zt, device=dev),
                                         torch.zeros(B, W1, dtype=torch.bool, device=dev))
                self._fill_ring(i, self.hist[i])

    def _fill_ring(self, i, ring):
        """Write the cache's routing history of layer i into the ring, in place and left-padded with invalid slots;
        the cache's history is the ring from then on."""
        old, W1 = self.cache.route_history(i), ring.z.shape[1]
        if old is ring:
            return
        ring.z.zero_()
        ring.valid.fill_(False)
        if old is not None and W1 > 0:
            n = min(old.z.shape[1], W1)
            ring.z[:, W1 - n:] = old.z[:, old.z.shape[1] - n:]
            ring.valid[:, W1 - n:] = old.valid[:, old.valid.shape[1] - n:]
        self.cache.routes[i] = ring

    def _spans(self) -> dict:
        """Slots each writing layer attends this step: its stored bound plus the new token, rounded up to a power of
        two (>= CHUNK) and capped by its buffer. A reused cache (MoDCache.reset()) holding a long request's buffers
        does not make a short one attend all of them; a span changes log2(length) times in a generation."""
        out = {}
        for i in self.writers:
            L = self.cache.layers[i]
            out[i] = min(L.k.shape[2], max(CHUNK, 1 << L.bound.bit_length()))
        return out

    # -- the pieces (each writes only into buffers allocated above) ----------------------------------------
    def _embed(self):
        st, m = self.st, self.model
        h = m.model.embed_tokens(st["ids"])
        cos, sin = m.model.rotary_emb(h, st["pos"][:, None])
        st["h"].copy_(h)
        st["cos"].copy_(cos)
        st["sin"].copy_(sin)

    def _write(self, i, k, v, write):
        L, st = self.cache.layers[i], self.st
        B, H, _, D = k.shape
        at = L.length.view(B, 1, 1, 1).expand(B, H, 1, D)
        L.k.scatter_(2, at, k.to(L.k.dtype))
        L.v.scatter_(2, at, v.to(L.v.dtype))
        L.pos.scatter_(1, L.length[:, None], st["pos"][:, None])
        L.valid.scatter_(1, L.length[:, None], write[:, None])
        L.length.add_(write.long())

    def _attention(self, i, x, write):
        """The layer's attention for the step's token: K/V written where `write`, queries over every valid slot of
        the layer's span."""
        layer, st, L = self.model.model.layers[i], self.st, self.cache.layers[i]
        attn = layer.self_attn
        q, k, v = _qkv(attn, x, st["cos"], st["sin"])
        self._write(i, k, v, write)
        n = self.spans[i]
        mask = L.valid[:, :n]
        window = _window(layer, self.model.config)
        if window is not None:
            mask = mask & ((st["pos"][:, None] - L.pos[:, :n]) < window)
        mask = mask | ~mask.any(-1, keepdim=True)  # a row with nothing to see (a discarded one) sees every slot
        o = F.scaled_dot_product_attention(q, L.k[:, :, :n], L.v[:, :, :n], attn_mask=mask[:, None, None, :],
                                           scale=attn.scaling, enable_gqa=q.shape[1] != L.k.shape[1])
        return attn.o_proj(o.transpose(1, 2).reshape(q.shape[0], 1, -1))

    def _dense(self, i):
        layer, h = self.model.model.layers[i], self.st["h"]
        h1 = h + self._attention(i, layer.input_layernorm(h), self.st["ok"])
        h.copy_(h1 + layer.mlp(layer.post_attention_layernorm(h1)))

    def _decide(self, i):
        layer, st, cfg = self.model.model.layers[i], self.st, self.model.mod_config
        z = layer.router(router_input(layer, st["h"], cfg.router_input))
        hist = self.hist.get(i)
        sel, _ = R.select(z, st["ok"][:, None], cfg, i, True, st["pos"][:, None], None, hist)
        if hist is not None and hist.z.shape[1] > 0:
            hist.z.copy_(torch.cat([hist.z[:, 1:], z.to(hist.z.dtype)], 1))
            hist.valid.copy_(torch.cat([hist.valid[:, 1:], st["ok"][:, None]], 1))
        self.z[i].copy_(z)
        self.sel[i].copy_(sel[:, 0])
        self.w[i].copy_(R.block_weight(z, cfg))
        self.flag[i].copy_(sel.any())

    def _body(self, i):
        layer, st, cfg = self.model.model.layers[i], self.st, self.model.mod_config
        h, run = st["h"], self.sel[i]
        keep = cfg.skipped_kv == "keep"
        a = self._attention(i, layer.input_layernorm(h), st["ok"] if keep else run)
        out = _gated(layer, h, a, self.w[i][..., None].to(h.dtype), cfg.gate_mode)
        h.copy_(torch.where(run[:, None, None], out, h))

    def _kv_only(self, i):
        """'keep' with no row running the layer: every valid token's K/V are still stored."""
        layer, st = self.model.model.layers[i], self.st
        k, v = _kv(layer.self_attn, layer.input_layernorm(st["h"]), st["cos"], st["sin"])
        self._write(i, k, v, st["ok"])

    def _head(self):
        m, st = self.model, self.st
        st["logits"].copy_(m.lm_head(m.model.norm(st["h"])))

    # -- running ----------------------------------------------------------------------------------------
    def _run(self, name, fns, attends):
        """Run one piece: directly, or (graphs) warm it up, then capture it, then replay it. A capture is for the
        spans of the layers the piece attends: each span keeps its own, so a reset cache's next request, which starts
        at shorter spans, replays those captured when an earlier request passed them."""
        if not self.graphs:
            for f in fns:
                f()
            return
        key = (name, tuple(self.spans[i] for i in attends))
        replay = self._g.get(key)
        if replay is None:
            if key not in self._warm:  # the first call is the warm-up, a real step
                self._warm.add(key)
                self.warmup(fns)
                return
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            try:
                replay = self._g[key] = self.capture(fns, self._pool)
            except Exception as e:  # noqa: BLE001 - any capture failure: the piece runs as it is, and says so
                self._give_up_graphs(name, e)
                for f in fns:  # a capture records and runs nothing: the step is still to be made
                    f()
                return
        replay()

    def _give_up_graphs(self, name, error):
        """A piece that cannot be captured: this cache decodes on as 'static' (no graphs), and one line says so. Out
        of memory is this cache's problem; anything else (an op a graph does not allow) is the model's, and later
        generations do not try again."""
        cause = error.__context__ or error  # a failed capture's own error, not capture_end's "previous error"
        msg = f"{type(cause).__name__}: {(str(cause).splitlines() or [''])[0][:200]}"
        self.graphs, self._g, self._pool = False, {}, None
        oom = isinstance(cause, torch.cuda.OutOfMemoryError)
        if not oom:
            self.model._mod_graph_error = msg
        print(f"[mod_train] warning: CUDA graph capture of decode piece {name!r} failed ({msg}); "
              f"{'this generation' if oom else 'this model'} decodes with decode='static' (the same steps, without "
              f"graphs){'' if oom else ' from now on'}", flush=True)

    @staticmethod
    def warmup(fns):
        """Run the piece on a side stream (lazy initialisations happen outside any capture)."""
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for f in fns:
                f()
        torch.cuda.current_stream().wait_stream(s)

    @staticmethod
    def capture(fns, pool):
        """Record the piece as a CUDA graph (recorded, not run) in the shared pool; returns its replay. A capture that
        fails leaves the caller's stream current again and the pool no longer capturing, then raises."""
        g = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream()
        try:
            with torch.cuda.graph(g, pool=pool):
                for f in fns:
                    f()
        except BaseException:  # pragma: no cover - needs CUDA (tests/test_static_decode.py runs it there)
            # torch.cuda.graph's exit skips both when capture_end raises on an invalidated capture
            torch.cuda.set_stream(stream)
            try:
                torch._C._cuda_endAllocateToPool(stream.device.index, pool)
            except Exception:  # noqa: BLE001 - already ended by a capture_end that got that far
                pass
            torch.cuda.synchronize()
            raise
        return g.replay

    @torch.no_grad()
    def step(self, input_ids, attention_mask=None, position_ids=None):
        """One decode step: input_ids [B, 1] -> (logits [B, 1, V], {routed layer: {'rate', 'gate'}})."""
        cache, cfg = self.cache, self.model.mod_config
        B = input_ids.shape[0]
        self._prepare(B)
        self.spans = self._spans()
        st = self.st
        st["ids"].copy_(input_ids)
        if position_ids is not None:
            st["pos"].copy_(position_ids[:, -1])
        elif attention_mask is not None:
            st["pos"].copy_((attention_mask.long().sum(-1) - 1).clamp(min=0))
        else:
            st["pos"].fill_(cache.seen)
        if attention_mask is not None:
            st["ok"].copy_(attention_mask[:, -1].bool())
        else:
            st["ok"].fill_(True)
        wrote = set(self.writers) - set(self.routed)
        for item in self.plan:
            if item[0] == "piece":
                self._run(*item[1:])
                continue
            i = item[1]
            if bool(self.flag[i]):  # the one host decision of a routed layer: does any row run it
                self._run(("body", i), [partial(self._body, i)], (i,))
                wrote.add(i)
            elif cfg.skipped_kv == "keep":
                self._run(("kv", i), [partial(self._kv_only, i)], ())
                wrote.add(i)
        for i in wrote:  # host-side bookkeeping of the eager path: an upper bound, and masks from now on
            L = cache.layers[i]
            L.bound += 1
            L.padded = True
        cache.seen += 1
        routing = {i: {"rate": self.sel[i].float().mean(), "gate": torch.sigmoid(self.z[i]).mean()}
                   for i in self.routed}
        return st["logits"].clone(), routing


def static_decode_applies(model, cache, input_ids, inputs_embeds, labels, doc_ids) -> bool:
    """The forward is one decode step the static path can take (else the eager path runs; the model also keeps
    distributed runs eager, where ZeRO-3 / TP hooks gather weights around every sub-module call)."""
    cfg = model.mod_config
    return (cfg.decode != "eager" and cache is not None and cache.seen > 0 and input_ids is not None
            and input_ids.shape[1] == 1 and inputs_embeds is None and labels is None and doc_ids is None
            and not torch.is_grad_enabled() and cfg.impl == "fast" and model._taps is None)


def static_decoder(model, cache) -> StaticDecoder:
    """The cache's static decoder (made at its first static step, again if the model or the setting changes)."""
    graphs = model.mod_config.decode == "cuda_graphs"
    dec = cache.static
    if dec is None or dec.model is not model or dec.wanted != graphs:
        dec = cache.static = StaticDecoder(model, cache, graphs)
    return dec
