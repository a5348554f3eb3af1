import math

import torch
from torch import nn

from lzn.data.stream import StepRandom
from lzn.objectives import (
    AlignConfig,
    GenerationObjective,
    JointObjective,
    LatentConfig,
    RepresentationObjective,
    SimCLRObjective,
    rectified_flow_loss,
)
from lzn.objectives.joint import global_class_counts
from lzn.objectives.simclr import nt_xent
from lzn.zoning import alignment_loss, compute_latents
from tests.lzn.toy import ToyDecoder, ToyEncoder, toy_images


class Zero(nn.Module):
    def forward(self, x, t, cond):
        return torch.zeros_like(x)


class Identity(nn.Module):
    def forward(self, x, t, cond):
        return x


def test_rectified_flow_loss_by_hand():
    x = torch.tensor([[[[1.0, -1.0]]]])  # (1, 1, 1, 2)
    noise = torch.tensor([[[[0.5, 0.5]]]])
    t = torch.tensor([0.25])
    # target x - noise = (0.5, -1.5); zero velocity: mean(0.25, 2.25) = 1.25
    assert rectified_flow_loss(Zero(), x, None, t, noise).item() == 1.25
    # identity decoder returns x_t = 0.25 x + 0.75 noise = (0.625, 0.125): error (0.125, 1.625)
    want = (0.125**2 + 1.625**2) / 2
    assert math.isclose(rectified_flow_loss(Identity(), x, None, t, noise).item(), want, rel_tol=1e-6)


def test_generation_objective_is_rf_loss_on_lzn_latents():
    images, _ = toy_images(8)
    obj = GenerationObjective(ToyEncoder(), ToyDecoder(), LatentConfig(dim=3, steps=5))
    rng = StepRandom(0, 7)
    loss, metrics = obj.loss({"images": images, "rng": rng})
    rng = StepRandom(0, 7)
    z = compute_latents(obj.encoder(images), rng.normal(8, 3), steps=5, solver="dpm++")
    t = rng.uniform(8) * (1 - 1e-3) + 1e-3
    want = rectified_flow_loss(obj.decoder, images, z, t, rng.normal(8, 1, 4, 4))
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert obj.encoder.head.weight.grad.abs().sum() > 0  # trained end to end through the flow


def test_rf_baseline_has_no_encoder():
    obj = GenerationObjective(None, ToyDecoder(cond_dim=0), LatentConfig(dim=3))
    assert not obj.uses_lzn and [n for n, _ in obj.named_children()] == ["decoder"]
    loss, _ = obj.loss({"images": toy_images(4)[0], "rng": StepRandom(0, 0)})
    assert torch.isfinite(loss)


def test_representation_objective_aligns_view1_latents_to_view2_anchors():
    images, _ = toy_images(8)
    views = torch.stack([images, images.flip(-1)])
    lat, al = LatentConfig(dim=3, steps=4, solver="euler", eps=1e-4, alpha=0.45), AlignConfig(steps=6)
    obj = RepresentationObjective(ToyEncoder(), lat, al)
    loss, metrics = obj.loss({"views": views, "rng": StepRandom(1, 3)})
    z = compute_latents(obj.encoder(views[0]), StepRandom(1, 3).normal(8, 3), steps=4, solver="euler",
                        eps=1e-4, alpha=0.45)
    want, acc = alignment_loss(z, obj.encoder(views[1]), torch.arange(8), steps=6, cutoff=0.2)
    torch.testing.assert_close(loss, want)
    assert metrics["train/align_acc"] == acc


def test_nt_xent_matches_brute_force():
    torch.manual_seed(0)
    p1, p2 = torch.randn(5, 4), torch.randn(5, 4)
    got = nt_xent(p1, p2, p1, p2, torch.arange(5), 0.5)
    z = nn.functional.normalize(torch.cat([p1, p2]), dim=1)
    total = 0.0
    for i in range(10):
        pos = (i + 5) % 10
        sims = [math.exp(float(z[i] @ z[j]) / 0.5) for j in range(10) if j != i]
        total += -math.log(math.exp(float(z[i] @ z[pos]) / 0.5) / sum(sims))
    assert math.isclose(got.item(), total / 10, rel_tol=1e-5)
    obj = SimCLRObjective(ToyEncoder())
    loss, _ = obj.loss({"views": torch.stack([toy_images(6)[0]] * 2), "rng": StepRandom(0, 0)})
    assert torch.isfinite(loss)


class Labels(nn.Module):
    def __init__(self, c, q):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c, q) * 3)

    def forward(self):
        return self.weight


def test_joint_objective_weights_label_flow_by_batch_frequencies():
    images, labels = toy_images(16)
    counts = global_class_counts(labels, 4)
    assert torch.equal(counts, torch.bincount(labels, minlength=4).float())
    al = AlignConfig(steps=10, solver="euler", cutoff=0.2, log=False, weight=0.5)
    obj = JointObjective(ToyEncoder(), ToyDecoder(cond_dim=3 + 4), Labels(4, 3), LatentConfig(dim=3, steps=4),
                         al)
    cond = obj.condition(torch.zeros(2, 3), torch.tensor([1, 3]))
    assert cond.tolist() == [[0, 0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0, 1]]
    loss, m = obj.loss({"images": images, "labels": labels, "rng": StepRandom(0, 1)})
    torch.testing.assert_close(loss, m["loss/rf"] + 0.5 * m["loss/align"])
    rng = StepRandom(0, 1)
    z = compute_latents(obj.encoder(images), rng.normal(16, 3), steps=4, solver="dpm++")
    want, _ = alignment_loss(z, obj.labels(), labels, steps=10, cutoff=0.2, log=False, weights=counts)
    torch.testing.assert_close(m["loss/align"], want.detach())
    loss.backward()
    assert obj.labels.weight.grad.abs().sum() > 0
