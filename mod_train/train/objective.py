"""The training objective: LM loss, distillation from the dense original (forward KL), or both, plus the MoD
auxiliary loss the model returns.

    total = lm_weight * LM + kd_weight * KD + aux          (objective 'lm+kd'; 'lm' / 'kd' drop a term)
    KD    = T^2 * mean over predicted positions of KL( softmax(teacher / T) || softmax(student / T) )

over the full vocabulary (Minitron, arXiv 2407.14679: forward KL on the logits alone at T = 1 beat CE+KL and
top-k logits). The positions are exactly the LM loss's: logits at t predict token t+1, and a target that is
padding or the first token of a packed document (label -100) is not predicted.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def predicted_mask(labels: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """[B, S-1] bool: logits at position t are scored iff labels[t+1] is a real target and token t+1 starts
    no new packed document (the LM loss's rule, mod/model.py mod_head)."""
    mask = labels[:, 1:] != IGNORE
    if doc_ids is not None:
        mask = mask & (doc_ids[:, 1:] == doc_ids[:, :-1])
    return mask


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
            temperature: float = 1.0, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Forward KL(teacher || student) per predicted position, averaged over them (fp32, full vocabulary)."""
    mask = predicted_mask(labels.to(student_logits.device),
                          None if doc_ids is None else doc_ids.to(student_logits.device))
    s = student_logits[:, :-1][mask].float() / temperature
    t = teacher_logits[:, :-1][mask].float() / temperature
    if s.numel() == 0:
        return student_logits.sum() * 0.0
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum")
    return kl * temperature ** 2 / mask.sum()


def combine(tc, lm: torch.Tensor, aux: torch.Tensor, kd: torch.Tensor | None) -> torch.Tensor:
    """The loss to backpropagate for `tc.objective`."""
    total = aux.to(lm.dtype)
    if tc.objective in ("lm", "lm+kd"):
        total = total + tc.lm_weight * lm
    if kd is not None:
        total = total + tc.kd_weight * kd.to(lm.dtype)
    return total


def objective_total(tc, metrics: dict) -> float:
    """The logged `loss`: the objective's total from the logged terms (loss/lm, loss/kd, loss/aux)."""
    total = metrics["loss/aux"]
    if tc.objective in ("lm", "lm+kd"):
        total += tc.lm_weight * metrics["loss/lm"]
    if "loss/kd" in metrics:
        total += tc.kd_weight * metrics["loss/kd"]
    return total
