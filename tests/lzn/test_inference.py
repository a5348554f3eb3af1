"""lzn.inference: latents drawn inside a label's zone are the reference's."""
import pytest
import torch

from lzn import sampling
from lzn.inference import LZNModel
from lzn.models import LabelAnchors
from lzn.objectives import AlignConfig, JointObjective, LatentConfig
from lzn.task import TaskConfig, validate_task
from tests.lzn.toy import ToyDecoder, ToyEncoder


def reference_label_latents(anchors, labels, prior, steps, eps):
    """The reference's get_latent_from_label in float64 (microsoft/latent-zoning-networks,
    lzn/trainer/generation_trainer.py:562-573 through lzn/latent_flow/euler_latent_flow.py,
    EulerLatentFlow(eps=1e-4)._forward and _velocity): start at eps * prior + (1 - eps) a_label
    at t = eps, forward Euler to t = 1 in steps of (1 - eps) / steps, uniform weights, velocity
    sum_j pdf_j (noise_j - a_j) / sum_j pdf_j with noise_j = (x - (1 - t) a_j) / t and pdf the
    standard Gaussian density of noise_j (normalised here by a softmax of its log)."""
    a = anchors.double()
    x = eps * prior.double() + (1 - eps) * a[labels]
    t, h = eps, (1 - eps) / steps
    for _ in range(steps):
        noise = (x[:, None, :] - (1 - t) * a[None]) / t  # (B, N, q)
        p = torch.softmax(-0.5 * (noise ** 2).sum(-1), dim=1)  # (B, N)
        x = x + h * (p[:, :, None] * (noise - a[None])).sum(1)
        t += h
    return x


def _joint_model(align: AlignConfig, q: int = 4, classes: int = 5) -> LZNModel:
    torch.manual_seed(0)
    obj = JointObjective(ToyEncoder(latent_dim=q), ToyDecoder(cond_dim=q + classes), LabelAnchors(classes, q),
                         LatentConfig(dim=q, steps=4), align)
    with torch.no_grad():
        # Anchors ~0.03 apart: there g decides where in its zone a latent lands (eps 1e-3
        # against 1e-4 moves latents by 0.1). Anchors of norm ~3 are moved by ~1e-5 only,
        # below float32's error of the flow (~1e-3), so no test could tell the two apart.
        obj.labels.anchors.mul_(0.02)
    return LZNModel(obj, (1, 4, 4))


def test_label_zone_latents_start_at_the_references_g_not_the_alignments_eps():
    # The joint tasks align at eps = 1e-3; the reference samples label zones from 1e-4.
    align = AlignConfig(steps=100, solver="euler", eps=1e-3, cutoff=0.2, log=False)
    assert align.zone_eps == 1e-4
    model = _joint_model(align)
    anchors = model.objective.labels().detach()
    labels = torch.arange(40) % 5
    got = model.label_latents(labels, seed=3)
    prior = sampling.seeded_normal(3, 40, 4)
    want = reference_label_latents(anchors, labels, prior, steps=100, eps=1e-4)
    torch.testing.assert_close(got.double(), want, rtol=0.0, atol=2e-4)
    # What the test tells apart: starting at the alignment's eps lands elsewhere.
    other = reference_label_latents(anchors, labels, prior, steps=100, eps=1e-3)
    assert (other - want).abs().max() > 5e-2


def test_label_zone_eps_outside_the_unit_interval_is_a_clear_error():
    model = _joint_model(AlignConfig(steps=3, zone_eps=0.0))
    with pytest.raises(ValueError, match=r"align.zone_eps must lie in \(0, 1\), got 0.0"):
        model.label_latents(torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"align.zone_eps must lie in \(0, 1\), got 1.5"):
        validate_task(TaskConfig(align=AlignConfig(zone_eps=1.5)))
