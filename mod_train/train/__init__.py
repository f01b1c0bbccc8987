"""The loop: a DeepSpeed engine (engine.py) over the model, the optimiser's pieces (optim.py), one optimizer
step and its metrics (step.py), the run (trainer.py: resume, log, checkpoint, signals), checkpoints
(checkpoint.py), logging (logger.py) and export to a HF directory (export.py).

    from mod_train.train.trainer import Trainer, train
"""
