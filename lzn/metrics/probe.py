"""Linear probe: the representation-learning metric of case study 2.

The reference's protocol (lzn/metric/linear_probing.py with configs/lzn1/case_study_2.py:
99-109): freeze the backbone, take its 2048-d features before the head, train one linear
layer on them with AdamW (lr 3e-4, weight decay 0, 300 epochs, batch 8192 = the eval
batch), report top-1 and top-5 on the validation set, whose images are Resize(256) +
CenterCrop(224) (lzn/data/imagenet_aug.py:39-46). Features go in raw, as the reference's.
`standardize=True` is today's earlier protocol, kept as a named alternative for one reason:
it divides out the feature scale, so one learning rate suits backbones whose features
differ in scale by orders of magnitude (raw pixels, an untrained network).

Where we differ, and why:
- The probe's training images get the evaluation transform too, and are embedded once.
  The reference's train loader (linear_probing.py:218-227, train=True, evaluation=False)
  is its DoubleImageNet of two augmented views (imagenet_aug.py:16-22, 47-51): a
  (B, 2, 3, 224, 224) batch that its ResNet's first conv rejects, so that path cannot
  run as released; its train images at the evaluation transform (`evaluation=True`,
  imagenet_aug.py:52-56) are what the other metrics use and what we use.
- Every training image is used every epoch (the reference drops the last partial batch:
  3584 of 1.28M images an epoch at batch 8192).
- The layer starts at zero (the problem is convex) instead of torch's random init, so the
  result is a deterministic function of the seed on a given device.

The defaults assume ImageNet's many steps per epoch. On a small set the same 300 epochs
are few steps: raw digits pixels (1257 images, 1500 steps) reach top-1 0.93 at lr 3e-4 and
0.96 at lr 3e-3, so the digits tasks should pass a larger `lr`.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torchmetrics.functional.classification import multiclass_accuracy
from tqdm.auto import tqdm

from lzn.metrics.classification import check_batch_size, check_images

Embed = Callable[[Tensor], Tensor]  # images (B, C, H, W) -> features (B, d)

# tqdm's `delay`: the bar appears only once a probe has run this long, so small probes
# (digits, tests) stay silent and ImageNet-sized ones show progress.
PROGRESS_DELAY_S = 3.0


def _check_features(features: Tensor, labels: Tensor, split: str) -> None:
    if not isinstance(features, Tensor) or features.dim() != 2 or not features.is_floating_point():
        raise ValueError(
            f"{split}_features must be a floating tensor of shape (N, d), got "
            f"{getattr(features, 'dtype', type(features).__name__)} {tuple(getattr(features, 'shape', ()))}"
        )
    if not isinstance(labels, Tensor) or labels.shape != (features.shape[0],) or labels.is_floating_point():
        raise ValueError(
            f"{split}_labels must be an integer tensor of shape ({features.shape[0]},), got "
            f"{getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}"
        )
    if features.shape[0] == 0:
        raise ValueError(f"{split}_features is empty; the probe needs at least one sample")
    if not torch.isfinite(features).all():
        raise ValueError(f"{split}_features contains NaN or Inf")
    if int(labels.min()) < 0:
        raise ValueError(f"{split}_labels must be class indices >= 0, got minimum {int(labels.min())}")


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    epochs: int = 300,
    lr: float = 3e-4,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    seed: int = 0,
    standardize: bool = False,
    progress: bool = True,
) -> dict[str, float]:
    """Train one linear layer on frozen features with AdamW; return test {"top1", "top5"}.

    train_features: (N, d), train_labels: (N,) int64 in [0, K); test_features: (M, d),
    test_labels: (M,). Runs on the features' device. K is the largest label seen plus one;
    with fewer than 5 classes "top5" is top-K (so 1.0). The layer starts at zero (the problem
    is convex, so the start only matters through the seeded shuffling order), which makes the
    result a deterministic function of `seed` on a given device. standardize: features are
    first shifted and scaled by the training set's mean and std (the reference: raw).
    progress: False draws no bar (a sweep trial's evaluation); True tqdm's over the epochs.
    """
    _check_features(train_features, train_labels, "train")
    _check_features(test_features, test_labels, "test")
    if test_features.shape[1] != train_features.shape[1]:
        raise ValueError(
            f"train and test features must have the same width, got {train_features.shape[1]} "
            f"and {test_features.shape[1]}"
        )
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive int, got {epochs!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    check_batch_size(batch_size)

    device = train_features.device
    test_features = test_features.to(device)
    train_labels, test_labels = train_labels.to(device), test_labels.to(device)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1

    x_train, x_test = train_features.float(), test_features.float()
    if standardize:
        # Train statistics only, so nothing about the test set leaks into the probe.
        mean = x_train.mean(dim=0)
        std = x_train.std(dim=0).clamp_min(1e-6)  # constant features (dead pixels) become 0
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std

    head = torch.nn.Linear(x_train.shape[1], num_classes, device=device)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator(device="cpu").manual_seed(seed)

    n = x_train.shape[0]
    epoch_bar = tqdm(range(epochs), desc="linear probe", unit="epoch", delay=PROGRESS_DELAY_S, leave=False) \
        if progress else range(epochs)
    with torch.enable_grad():
        for _ in epoch_bar:
            order = torch.randperm(n, generator=generator).to(device)
            for idx in torch.split(order, batch_size):
                loss = torch.nn.functional.cross_entropy(head(x_train[idx]), train_labels[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

    with torch.no_grad():
        logits = torch.cat([head(x) for x in torch.split(x_test, 4096)])
    top5_k = min(5, num_classes)
    return {
        "top1": float(multiclass_accuracy(logits, test_labels, num_classes=num_classes, average="micro", top_k=1)),
        "top5": float(
            multiclass_accuracy(logits, test_labels, num_classes=num_classes, average="micro", top_k=top5_k)
        ),
    }


@torch.no_grad()
def embed_images(embed: Embed, images: Tensor, *, batch_size: int = 256, name: str = "images") -> Tensor:
    """Features (N, d) of images (N, C, H, W), embedded in batches under no_grad.

    Batches are passed as stored (the callable moves them to its device); the features are
    concatenated on the device the callable returns them on.
    """
    check_images(images, name=name)
    check_batch_size(batch_size)
    chunks = []
    for x in torch.split(images, batch_size):
        f = embed(x)
        if f.dim() != 2 or f.shape[0] != x.shape[0]:
            raise ValueError(
                f"embed must return features of shape (B, d) for a batch of B={x.shape[0]}, got {tuple(f.shape)}"
            )
        chunks.append(f.detach())
    return torch.cat(chunks)


def linear_probe_eval(
    embed: Embed,
    train_images: Tensor,
    train_labels: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    *,
    batch_size: int = 256,
    probe_batch_size: int = 256,
    **kw,
) -> dict[str, float]:
    """Embed both splits with `embed` (images (B, C, H, W) -> (B, d)), then `linear_probe`.

    `batch_size` is the embedding batch, `probe_batch_size` the probe's SGD batch; `**kw`
    goes to `linear_probe` (epochs, lr, weight_decay, seed, standardize, progress). Returns {"top1", "top5"}.
    """
    train_features = embed_images(embed, train_images, batch_size=batch_size, name="train_images")
    test_features = embed_images(embed, test_images, batch_size=batch_size, name="test_images")
    return linear_probe(train_features, train_labels, test_features, test_labels, batch_size=probe_batch_size, **kw)
