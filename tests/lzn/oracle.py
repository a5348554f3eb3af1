"""Brute-force float64 LZN math written from the definitions and from the reference code
(microsoft/latent-zoning-networks at 17a8529), never from ours: loops over anchors, no
expansion of the square, no chunking, no precomputed coefficients. Slow and obviously right.

- `latents_euler`, `alignment_euler`: the loops of the reference's
  `lzn/latent_flow/euler_latent_flow.py` (`_forward`, `_reverse`) and the loss of its
  `contrastive_trainer.py` / `generation_trainer.py`.
- `dpm_solver_multistep`: the multistep loop and updates of its
  `lzn/latent_flow/dpm_solver_LZN.py` (`DPM_Solver.sample`, "dpmsolver++", "dpmsolver"
  type), with `NoiseScheduleRectFlow` (alpha = 1 - t, sigma = t) and the grids of its
  `dpm_solver_latent_flow.py`.
"""
import math

import torch


def log_posterior(x, anchors, tau, log_weights=None):
    """log P(j | x, tau) (B, N) with an explicit loop over anchors."""
    n = anchors.shape[0]
    lw = torch.zeros(n, dtype=x.dtype) if log_weights is None else log_weights
    cols = [lw[j] - ((x - (1 - tau) * anchors[j]) ** 2).sum(dim=1) / (2 * tau**2) for j in range(n)]
    return torch.log_softmax(torch.stack(cols, dim=1), dim=1)


def posterior_mean(x, anchors, tau, log_weights=None):
    p = log_posterior(x, anchors, tau, log_weights).exp()
    return sum(p[:, j : j + 1] * anchors[j] for j in range(anchors.shape[0]))


def velocity(x, anchors, tau, log_weights=None):
    return (x - posterior_mean(x, anchors, tau, log_weights)) / tau


def latents_euler(anchors_local, noise, anchors_all, steps, eps, alpha=1.0, log_weights=None):
    """Reference `_forward`: t = eps, n steps of (1 - eps) / n, from eps * prior + (1 - eps) a."""
    step_size = (1 - eps) / steps
    t = eps
    x = eps * (alpha * noise) + (1 - eps) * anchors_local
    for _ in range(steps):
        x = x + step_size * velocity(x, anchors_all, t, log_weights)
        t = t + step_size
    return x


def alignment_euler(latents, anchors, targets, steps, cutoff, log=True, log_weights=None):
    """Reference `_reverse` + loss: t = 1 -> 0 in steps of 1/n, the posterior recorded
    before each step, the first int(n * cutoff) records dropped, -[log] max of the rest.

    Accuracy (ours; the reference logs the mean P(target) of the last record instead): the
    share of rows whose last record's argmax is the target.
    """
    x, t, step_size = latents, 1.0, 1.0 / steps
    records = []
    for _ in range(steps):
        records.append(log_posterior(x, anchors, t, log_weights))
        x = x - step_size * velocity(x, anchors, t, log_weights)
        t = t - step_size
    rows = torch.arange(len(targets))
    target_p = torch.stack([r[rows, targets] for r in records]).exp()  # (steps, B)
    max_p = target_p[int(steps * cutoff) :].max(dim=0).values
    loss = -torch.log(max_p).mean() if log else -max_p.mean()
    acc = (records[-1].argmax(dim=1) == targets).double().mean()
    return loss, acc


def _lam(t):
    return math.log(1 / t - 1)


def dpm_solver_multistep(x, anchors, t_start, t_end, steps, order, log_weights=None, lower_order_final=True):
    """The reference's multistep DPM-Solver++ from t_start to t_end on a time-uniform grid:
    the end point and the (t, x) pairs where the model was evaluated (its `pdfs`)."""
    ts = [t_start + (t_end - t_start) * k / steps for k in range(steps + 1)]

    def model(x, t):  # data prediction: x0 = (x - sigma * noise) / alpha = E[a | x, t]
        return posterior_mean(x, anchors, t, log_weights)

    def update(x, ms, tps, t, p):
        m0, t0 = ms[-1], tps[-1]
        h = _lam(t) - _lam(t0)
        phi_1 = math.expm1(-h)
        alpha_t, sigma_t, sigma_0 = 1 - t, t, t0
        if p == 1:
            return sigma_t / sigma_0 * x - alpha_t * phi_1 * m0
        m1, t1 = ms[-2], tps[-2]
        h_0 = _lam(t0) - _lam(t1)
        r0 = h_0 / h
        d1_0 = (1.0 / r0) * (m0 - m1)
        if p == 2:
            return sigma_t / sigma_0 * x - alpha_t * phi_1 * m0 - 0.5 * alpha_t * phi_1 * d1_0
        m2, t2 = ms[-3], tps[-3]
        h_1 = _lam(t1) - _lam(t2)
        r1 = h_1 / h
        d1_1 = (1.0 / r1) * (m1 - m2)
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
        phi_2 = phi_1 / h + 1.0
        phi_3 = phi_2 / h - 0.5
        return sigma_t / sigma_0 * x - alpha_t * phi_1 * m0 + alpha_t * phi_2 * d1 - alpha_t * phi_3 * d2

    tps, ms, visited = [ts[0]], [model(x, ts[0])], [(ts[0], x)]
    for step in range(1, order):
        x = update(x, ms, tps, ts[step], step)
        tps.append(ts[step])
        ms.append(model(x, ts[step]))
        visited.append((ts[step], x))
    for step in range(order, steps + 1):
        p = min(order, steps + 1 - step) if lower_order_final and steps < 10 else order
        x = update(x, ms, tps, ts[step], p)
        tps, ms = tps[1:] + [ts[step]], ms[1:]
        if step < steps:  # "We do not need to evaluate the final model value."
            ms.append(model(x, ts[step]))
            visited.append((ts[step], x))
    return x, visited


def latents_dpm(anchors_local, noise, anchors_all, steps, eps, order=3, alpha=1.0, log_weights=None):
    """Reference `DPMSolverLatentFlow._forward`: from eps * prior + (1 - eps) a, t = eps -> 1 - eps."""
    x = eps * (alpha * noise) + (1 - eps) * anchors_local
    return dpm_solver_multistep(x, anchors_all, eps, 1 - eps, steps, order, log_weights)[0]


def alignment_dpm(latents, anchors, targets, steps, eps, cutoff, order=3, log=True, log_weights=None):
    """Reference `DPMSolverLatentFlow._reverse` (t = 1 - eps -> eps) with the same loss:
    the posterior recorded where the model is evaluated, before each step."""
    _, visited = dpm_solver_multistep(latents, anchors, 1 - eps, eps, steps, order, log_weights)
    rows = torch.arange(len(targets))
    records = [log_posterior(x, anchors, t, log_weights) for t, x in visited]
    target_p = torch.stack([r[rows, targets] for r in records]).exp()
    max_p = target_p[int(steps * cutoff) :].max(dim=0).values
    return -torch.log(max_p).mean() if log else -max_p.mean()
