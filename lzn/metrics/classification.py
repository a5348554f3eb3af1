"""Accuracy and reconstruction metrics that take a callable, never a trainer.

`classification_accuracy` scores a classifier on labelled images, `conditional_accuracy`
scores a class-conditional generator by how often a fixed classifier recognises the class
it was asked for, `reconstruction_l2` scores an encode-then-decode round trip. Each runs
the callable in batches under `torch.no_grad()` and returns a plain float.

LZN's latents, and so its classifications and reconstructions, depend on the inference
batch (the zones are those of the batch): `batch_size` is an explicit argument so the
evaluation stage fixes it and logs it beside the number.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

Classify = Callable[[Tensor], Tensor]  # images (B, C, H, W) -> logits (B, K) or labels (B,)
Generate = Callable[[Tensor], Tensor]  # labels (B,) int64 -> images (B, C, H, W)
Reconstruct = Callable[[Tensor], Tensor]  # images (B, C, H, W) -> images (B, C, H, W)


def check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


def check_images(images: Tensor, name: str = "images", min_count: int = 1) -> None:
    """Raise ValueError unless `images` is a floating (N, C, H, W) tensor with N >= min_count."""
    if not isinstance(images, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor (N, C, H, W), got {type(images).__name__}")
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(
            f"{name} must be a floating tensor of shape (N, C, H, W), got dtype {images.dtype} "
            f"and shape {tuple(images.shape)}"
        )
    if images.shape[0] < min_count:
        raise ValueError(f"{name} must hold at least {min_count} image(s), got {images.shape[0]}")


def predicted_labels(output: Tensor, batch: int, name: str = "classify") -> Tensor:
    """Class indices (B,) from a classifier output: logits (B, K) are arg-maxed, labels (B,) pass."""
    if output.dim() == 2 and output.shape[0] == batch:
        return output.argmax(dim=1)
    if output.dim() == 1 and output.shape[0] == batch and not output.is_floating_point():
        return output
    raise ValueError(
        f"{name} must return logits (B, num_classes) or integer labels (B,) for a batch of "
        f"B={batch}, got dtype {output.dtype} and shape {tuple(output.shape)}"
    )


@torch.no_grad()
def classification_accuracy(classify: Classify, images: Tensor, labels: Tensor, *, batch_size: int = 256) -> float:
    """Top-1 accuracy of `classify` on labelled images.

    classify: images (B, C, H, W) -> logits (B, K) or predicted labels (B,) int.
    images: (N, C, H, W); labels: (N,) int64. Batches are passed as they are stored (the
    callable moves them to its device). Returns the fraction of correct predictions.
    """
    check_images(images)
    check_batch_size(batch_size)
    if labels.shape != (images.shape[0],) or labels.is_floating_point():
        raise ValueError(
            f"labels must be an integer tensor of shape ({images.shape[0]},) matching images, got "
            f"dtype {labels.dtype} and shape {tuple(labels.shape)}"
        )
    correct = 0
    for x, y in zip(torch.split(images, batch_size), torch.split(labels, batch_size)):
        pred = predicted_labels(classify(x), x.shape[0])
        correct += int((pred == y.to(pred.device)).sum())
    return correct / images.shape[0]


@torch.no_grad()
def conditional_accuracy(
    generate: Generate, classifier: Classify, *, num_classes: int, per_class: int, batch_size: int = 256
) -> float:
    """Fraction of class-conditional samples that `classifier` assigns to their conditioning label.

    generate: labels (B,) int64 -> images (B, C, H, W); classifier: images -> logits
    (B, num_classes). `per_class` samples are drawn for each of the `num_classes` labels;
    the labels are interleaved (0, 1, ..., K-1, 0, 1, ...) so every generation batch mixes
    classes, as a training batch does. Labels are created on the CPU; `generate` moves them.
    """
    for name, value in (("num_classes", num_classes), ("per_class", per_class)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    check_batch_size(batch_size)
    labels = torch.arange(num_classes).repeat(per_class)
    correct = 0
    for y in torch.split(labels, batch_size):
        images = generate(y)
        check_images(images, name="generate(labels)")
        if images.shape[0] != y.shape[0]:
            raise ValueError(
                f"generate returned {images.shape[0]} images for {y.shape[0]} labels; expected one image per label"
            )
        logits = classifier(images)
        if logits.dim() != 2 or logits.shape != (y.shape[0], num_classes):
            raise ValueError(
                f"classifier must return logits of shape ({y.shape[0]}, {num_classes}), got {tuple(logits.shape)}"
            )
        pred = logits.argmax(dim=1)
        correct += int((pred == y.to(pred.device)).sum())
    return correct / labels.shape[0]


@torch.no_grad()
def reconstruction_l2(reconstruct: Reconstruct, images: Tensor, *, batch_size: int = 256) -> float:
    """Mean over images of the Euclidean distance ||reconstruct(x) - x||_2 (per image, all pixels).

    reconstruct: images (B, C, H, W) -> images (B, C, H, W), e.g. encode to the LZN latent and
    invert the decoder ODE. images: (N, C, H, W), in the value range the model works in
    (the distance is not rescaled). Returns the mean distance as a float.
    """
    check_images(images)
    check_batch_size(batch_size)
    total = 0.0
    for x in torch.split(images, batch_size):
        recon = reconstruct(x)
        if recon.shape != x.shape:
            raise ValueError(
                f"reconstruct must return the input's shape {tuple(x.shape)}, got {tuple(recon.shape)}"
            )
        # float64 accumulation: summing tens of thousands of per-image norms in float32 drifts
        diff = (recon.double() - x.to(recon.device, torch.float64)).flatten(1)
        total += float(torch.linalg.vector_norm(diff, dim=1).sum())
    return total / images.shape[0]
