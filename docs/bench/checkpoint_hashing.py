"""How much the per-file checksums add to a checkpoint save of SmolLM2-135M (docs/training.md).

    OMP_NUM_THREADS=1 python docs/bench/checkpoint_hashing.py

One process, ZeRO-1 fp32 engine with AdamW states (2.0 GiB per checkpoint). Each save is timed whole
(DeepSpeed shards, trainer state, hf/ files, manifest, hashing included); the files are then hashed
again exactly as the save hashes them (from the page cache): that is the hashing share.
"""
import shutil
import statistics
import time

from mod_train import MoDConfig
from mod_train.offline import smollm2_path
from mod_train.train import checkpoint as ckpt
from mod_train.train.config import TrainConfig
from mod_train.train.trainer import RunSpec, Trainer

OUT = "/tmp/mod_train_hashbench"


def main(repeats: int = 3) -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    tc = TrainConfig(max_steps=1, seq_len=64, precision="fp32", wandb="disabled", progress=False, save_every=0,
                     keep_last=1, warmup_steps=0)
    tr = Trainer(RunSpec(model=str(smollm2_path()), out=OUT, recipe="synthetic"), tc, MoDConfig())
    tr.run()  # one step, so that the optimizer states exist
    tr.logger = None  # closed by run(); the saves below are only timed
    rows = []
    for i in range(repeats):
        tr.step = 100 + i
        t0 = time.perf_counter()
        d = tr.save()
        t_save = time.perf_counter() - t0
        files = [p for p in d.rglob("*") if p.is_file() and p.name != "MANIFEST.json"]
        size = sum(p.stat().st_size for p in files)
        t0 = time.perf_counter()
        ckpt.describe_files(d, files, 0)
        t_hash = time.perf_counter() - t0
        rows.append((t_save, t_hash))
        print(f"save {t_save:.2f} s (hashing included), hashing {t_hash:.2f} s ({size / 2**30:.2f} GiB, "
              f"{size / 2**30 / t_hash:.1f} GiB/s): +{t_hash / (t_save - t_hash):.1%}", flush=True)
    ts, th = statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows)
    print(f"median: save {ts:.2f} s, hashing {th:.2f} s: +{th / (ts - th):.1%} over a save without hashing")
    shutil.rmtree(OUT, ignore_errors=True)


if __name__ == "__main__":
    main()
