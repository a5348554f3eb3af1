"""Brute-force float64 LZN math written straight from the formulas: loops over anchors,
no expansion of the square, no chunking, no solver tricks. Slow and obviously right."""
import math

import torch


def log_posterior(x, anchors, tau, log_weights=None):
    """log P(j | x, tau) (B, N) with an explicit loop over anchors."""
    n = anchors.shape[0]
    lw = torch.zeros(n, dtype=x.dtype) if log_weights is None else log_weights
    cols = [lw[j] - ((x - (1 - tau) * anchors[j]) ** 2).sum(dim=1) / (2 * tau**2) for j in range(n)]
    return torch.log_softmax(torch.stack(cols, dim=1), dim=1)


def velocity(x, anchors, tau, log_weights=None):
    p = log_posterior(x, anchors, tau, log_weights).exp()
    mean = sum(p[:, j : j + 1] * anchors[j] for j in range(anchors.shape[0]))
    return (x - mean) / tau


def grid(steps, eps):
    return [eps + (1 - eps) * k / steps for k in range(steps + 1)]


def latents_euler(anchors_local, noise, anchors_all, steps, eps, alpha=1.0, log_weights=None):
    taus = grid(steps, eps)
    x = (1 - eps) * anchors_local + eps * alpha * noise
    for k in range(steps):
        x = x + (taus[k + 1] - taus[k]) * velocity(x, anchors_all, taus[k], log_weights)
    return x


def alignment_euler(latents, anchors, targets, steps, eps, cutoff, log=True, log_weights=None):
    taus = grid(steps, eps)[::-1]
    x = latents
    first_kept = math.floor(cutoff * steps) + 1
    kept = []
    for k in range(steps):
        x = x + (taus[k + 1] - taus[k]) * velocity(x, anchors, taus[k], log_weights)
        if k + 1 >= first_kept:
            lp = log_posterior(x, anchors, taus[k + 1], log_weights)
            lp_t = lp[torch.arange(len(targets)), targets]
            kept.append(lp_t if log else lp_t.exp())
    best = torch.stack(kept, dim=1).max(dim=1).values
    acc = (log_posterior(x, anchors, taus[-1], log_weights).argmax(dim=1) == targets).double().mean()
    return -best.mean(), acc
