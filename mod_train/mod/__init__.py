"""The method itself, free of any parallelism (no DeepSpeed import): router.py (the MoD math), attention.py,
layer.py, cache.py, model.py (the decoder stack), convert.py (modify / save / load, HF registration) and
calibrate.py (thresholds, the router probe and random routers, set from data without training)."""
