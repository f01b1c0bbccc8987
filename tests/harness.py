"""Fork-based multi-rank harness: import once, fork N CPU ranks that join one gloo world.

About 2.5-4 s per multi-rank run instead of 15-30 s for a real launcher. The parent never
initialises torch.distributed; each child sets RANK/WORLD_SIZE/MASTER_* and runs `fn(*args)`.

    results = run_ranks(worker, 2, tmp_path)      # list indexed by rank; raises on any failure
    procs = start_ranks(worker, 2, ...); ...; kill(procs, signal.SIGKILL)   # for preemption tests
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import traceback

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

_CTX = mp.get_context("fork")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank, world, port, fn, args, kwargs, q, env):
    try:
        os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                           "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                           "OMP_NUM_THREADS": "1", **(env or {})})
        import torch
        torch.set_num_threads(1)
        res = fn(*args, **kwargs)
        q.put((rank, True, pickle.dumps(res)))  # plain bytes: torch's shared-memory tensors die with the child
    except BaseException:  # noqa: BLE001
        q.put((rank, False, traceback.format_exc()))
    finally:
        try:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass
        q.close()
        q.join_thread()  # flush the result before the hard exit
    os._exit(0)


class Ranks:
    def __init__(self, procs, q, world):
        self.procs, self.q, self.world = procs, q, world

    def pids(self):
        return [p.pid for p in self.procs]

    def kill(self, sig):
        for p in self.procs:
            if p.is_alive():
                os.kill(p.pid, sig)

    def join(self, timeout=180, check=True):
        import queue as _q
        import time
        results, errors = {}, {}
        deadline = time.time() + timeout
        while len(results) + len(errors) < self.world and time.time() < deadline:
            try:
                rank, ok, res = self.q.get(timeout=0.2)
                res = pickle.loads(res) if ok else res
                (results if ok else errors)[rank] = res
            except _q.Empty:
                if all(not p.is_alive() for p in self.procs) and self.q.empty():
                    break
        for p in self.procs:
            p.join(timeout=max(0.1, deadline - time.time()))
        hung = [p.pid for p in self.procs if p.is_alive()]
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join()
        if check:
            if hung:
                raise TimeoutError(f"ranks {hung} did not finish within {timeout}s; errors so far: {errors}")
            if errors:
                raise RuntimeError("\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items())))
            missing = [r for r in range(self.world) if r not in results]
            if missing:
                codes = [p.exitcode for p in self.procs]
                raise RuntimeError(f"ranks {missing} died without a result (exit codes {codes})")
        return [results.get(r) for r in range(self.world)], errors, [p.exitcode for p in self.procs]


def start_ranks(fn, world_size, *args, env=None, **kwargs) -> Ranks:
    port = free_port()
    q = _CTX.Queue()
    procs = [_CTX.Process(target=_child, args=(r, world_size, port, fn, args, kwargs, q, env), daemon=False)
             for r in range(world_size)]
    for p in procs:
        p.start()
    return Ranks(procs, q, world_size)


def run_ranks(fn, world_size, *args, timeout=180, env=None, **kwargs) -> list:
    return start_ranks(fn, world_size, *args, env=env, **kwargs).join(timeout=timeout)[0]


# -- training helpers shared by tests/test_train*.py and tests/test_parallel*.py -----------------------

def make_tiny_model(path, layers=4, hidden=32, vocab=128, heads=4, kv_heads=2, seed=0, max_pos=512):
    """A random tiny dense Llama saved as a HF directory (the 'dense checkpoint' to convert)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                      max_position_embeddings=max_pos, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


TINY_TRAIN = dict(max_steps=4, seq_len=32, micro_batch_size=1, grad_accum=1, precision="fp32", lr=3e-3,
                  warmup_steps=1, wandb="disabled", progress=False, save_every=0, log_every=1)
TINY_MOD = dict(router_init="zero", threshold=0.5, alpha=0.05, layers="odd")


def train_worker(model, out, ds, train=None, mod=None, dense=False, recipe="synthetic", trace_routing=False,
                 init_routers=None, record_docs=False):
    """Runs mod_train.train.trainer.train in a harness rank; returns the result (+ routing trace).
    init_routers='random': token-dependent random routers (mod_train.random_routers) before the engine.
    record_docs: also return `seen`, {step: [(source, epoch, position) of every document segment in this
    rank's rows]} (steps counted from 1)."""
    from mod_train import MoDConfig
    from mod_train.config import TrainConfig
    from mod_train.train.trainer import RunSpec, train as run
    tc = TrainConfig(**{**TINY_TRAIN, **(train or {})})
    mc = MoDConfig(**{**TINY_MOD, **(mod or {})})
    trace, seen = [], {}

    def probe(trainer):
        if record_docs:
            fill = trainer.stream.fill

            def recording(n):
                ok = fill(n)
                if ok:
                    seen[trainer.step + 1] = [tuple(d[:3]) for row in trainer.stream.buffer for d in row["docs"]]
                return ok
            trainer.stream.fill = recording
        if not trace_routing:
            return
        for n, m in trainer.model.named_modules():
            if n.endswith("router"):
                m.register_forward_hook(lambda mod, inp, out, n=n: trace.append((n, out.detach().float().clone())))

    from mod_train.train.trainer import Trainer
    hook = None
    if init_routers == "random":
        from mod_train import random_routers

        def hook(trainer, m):
            import torch
            with torch.no_grad():
                random_routers(m, std=2.0)
    t = Trainer(RunSpec(model=model, out=str(out), ds=ds, recipe=recipe, dense=dense), tc, mc, after_setup=probe,
                before_engine=hook)
    res = t.run()
    if trace_routing:
        res["trace"] = trace
    if record_docs:
        res["seen"] = seen
    return res


def losses(out) -> dict:
    from mod_train.train.logger import read_metrics
    return read_metrics(f"{out}/metrics.jsonl")


def slow_steps(delay):
    """after_setup probe that makes every optimizer step take at least `delay` seconds (kill tests)."""
    def probe(trainer):
        import time
        orig = trainer.train_step

        def slowed(*a, **k):
            time.sleep(delay)
            return orig(*a, **k)
        trainer.train_step = slowed
    return probe


def train_worker_probe(model, out, ds, train=None, mod=None, delay=0.0):
    from mod_train import MoDConfig
    from mod_train.config import TrainConfig
    from mod_train.train.trainer import RunSpec, train as run
    tc = TrainConfig(**{**TINY_TRAIN, **(train or {})})
    return run(RunSpec(model=model, out=str(out), ds=ds), tc, MoDConfig(**{**TINY_MOD, **(mod or {})}),
               after_setup=slow_steps(delay) if delay else None)


def wait_for_step(out, step, timeout=120):
    import time
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if max(losses(out), default=0) >= step:
                return
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{out} never reached step {step}")


def make_tiny_model_with_tokenizer(path, texts, vocab=320, **kw):
    """A tiny dense Llama plus a byte-level BPE tokenizer trained on `texts`, in one HF directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab - 8, special_tokens=["<unk>", "<eos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    make_tiny_model(path, vocab=vocab, **kw)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>").save_pretrained(path)
    return str(path)


def write_tiny_recipe(tmp_path, n_docs=40, seq_len=64):
    """Two local jsonl sources + a recipe YAML using the tiny model's tokenizer. Returns (model, recipe)."""
    import json
    import random
    rng = random.Random(0)
    words = "the of and to in a is that for it as was with be by on not he this are or his from at which".split()
    docs = {s: [" ".join(rng.choice(words) for _ in range(rng.randint(20, 120))) for _ in range(n_docs)]
            for s in ("prose", "code")}
    for s, ds in docs.items():
        with open(tmp_path / f"{s}.jsonl", "w") as f:
            for i, d in enumerate(ds):
                f.write(json.dumps({"title": f"{s}{i}", "text": d}) + "\n")
    model = make_tiny_model_with_tokenizer(tmp_path / "model", docs["prose"] + docs["code"])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""name: tiny
tokenizer: {model}
stages:
  - seq_len: {seq_len}
sources:
  - name: prose
    type: jsonl
    path: {tmp_path / 'prose.jsonl'}
    weight: 0.5
  - name: code
    type: jsonl
    path: {tmp_path / 'code.jsonl'}
    weight: 0.5
""")
    return model, str(recipe)


def make_tiny_books_setup(d, docs, heldout=("doc1", "doc4", "doc7", "doc9"), name="tiny"):
    """`docs` as a jsonl source (titles doc0, doc1, ...), a tiny model + tokenizer trained on them, and a
    recipe with those held-out titles. Returns (model dir, recipe path)."""
    import json
    from pathlib import Path
    d = Path(d)
    with open(d / "books.jsonl", "w") as f:
        for i, t in enumerate(docs):
            f.write(json.dumps({"title": f"doc{i}", "text": t}) + "\n")
    model = make_tiny_model_with_tokenizer(d / "dense", docs, max_pos=512)
    recipe = d / "recipe.yaml"
    recipe.write_text(f"name: {name}\ntokenizer: {model}\nstages:\n  - seq_len: 64\nsources:\n  - name: books\n"
                      f"    type: jsonl\n    path: {d / 'books.jsonl'}\nheldout:\n  titles: [{', '.join(heldout)}]\n")
    return model, recipe
