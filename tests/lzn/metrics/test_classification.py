"""classification_accuracy, conditional_accuracy and reconstruction_l2 against hand-computed
values on tiny inputs whose answers can be worked out on paper."""
import pytest
import torch

from lzn.metrics import classification_accuracy, conditional_accuracy, reconstruction_l2


def _filled(values, shape=(1, 2, 2)):
    """Images (N, *shape) where image i is filled with values[i]."""
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, *shape).clone()


def _read_class(num_classes):
    """A 'classifier' that reads the class off the pixel value: one-hot logits (B, num_classes)."""
    def classify(images):
        return torch.nn.functional.one_hot(images[:, 0, 0, 0].round().long(), num_classes).float()
    return classify


@pytest.mark.parametrize("batch_size", [1, 2, 256])
def test_classification_accuracy_hand_computed(batch_size):
    images = _filled([0, 1, 2, 1, 0])  # predicted classes 0, 1, 2, 1, 0
    labels = torch.tensor([0, 1, 1, 1, 2])  # right on images 0, 1, 3: 3 of 5
    assert classification_accuracy(_read_class(3), images, labels, batch_size=batch_size) == pytest.approx(0.6)


def test_classification_accuracy_accepts_predicted_labels():
    images = _filled([3, 3, 1, 0])
    labels = torch.tensor([3, 2, 1, 1])  # right on 0 and 2
    classify = lambda x: x[:, 0, 0, 0].long()  # noqa: E731
    assert classification_accuracy(classify, images, labels, batch_size=3) == pytest.approx(0.5)


def test_classification_accuracy_rejects_bad_input():
    images = _filled([0, 1])
    with pytest.raises(ValueError, match="labels must be an integer tensor of shape \\(2,\\)"):
        classification_accuracy(_read_class(2), images, torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        classification_accuracy(_read_class(2), images, torch.tensor([0, 1]), batch_size=0)
    with pytest.raises(ValueError, match="logits \\(B, num_classes\\)"):
        classification_accuracy(lambda x: torch.zeros(7, 2), images, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="shape \\(N, C, H, W\\)"):
        classification_accuracy(_read_class(2), torch.zeros(2, 4), torch.tensor([0, 1]))


def test_conditional_accuracy_hand_computed():
    seen = []

    def generate(labels):
        seen.append(labels.clone())
        # A generator that gets class 2 wrong (draws a 0) and every other class right.
        drawn = torch.where(labels == 2, torch.zeros_like(labels), labels)
        return _filled(drawn.tolist(), shape=(1, 3, 3))

    acc = conditional_accuracy(generate, _read_class(3), num_classes=3, per_class=4, batch_size=5)
    assert acc == pytest.approx(8 / 12)
    # 12 labels in batches of 5, 5, 2, interleaved so each batch mixes classes.
    assert [len(y) for y in seen] == [5, 5, 2]
    assert torch.cat(seen).tolist() == [0, 1, 2] * 4
    assert not any(y.is_floating_point() for y in seen)


def test_conditional_accuracy_perfect_and_zero():
    perfect = lambda y: _filled(y.tolist())  # noqa: E731
    shifted = lambda y: _filled(((y + 1) % 4).tolist())  # noqa: E731
    assert conditional_accuracy(perfect, _read_class(4), num_classes=4, per_class=3) == 1.0
    assert conditional_accuracy(shifted, _read_class(4), num_classes=4, per_class=3) == 0.0


def test_conditional_accuracy_rejects_bad_input():
    perfect = lambda y: _filled(y.tolist())  # noqa: E731
    with pytest.raises(ValueError, match="per_class must be a positive int, got 0"):
        conditional_accuracy(perfect, _read_class(2), num_classes=2, per_class=0)
    with pytest.raises(ValueError, match="classifier must return logits of shape \\(4, 2\\)"):
        conditional_accuracy(perfect, _read_class(3), num_classes=2, per_class=2)
    with pytest.raises(ValueError, match="one image per label"):
        conditional_accuracy(lambda y: _filled([0]), _read_class(2), num_classes=2, per_class=2)


def test_reconstruction_l2_hand_computed():
    images = torch.zeros(3, 1, 2, 2)
    errors = torch.zeros(3, 1, 2, 2)
    errors[0, 0, 0] = torch.tensor([3.0, 4.0])  # distance 5
    errors[2, 0, 1, 1] = -2.0  # distance 2
    calls = iter(errors.split(1))  # batch_size=1: the i-th call reconstructs image i

    def reconstruct(x):
        return x + next(calls)

    # mean of 5, 0, 2
    assert reconstruction_l2(reconstruct, images, batch_size=1) == pytest.approx(7 / 3)


def test_reconstruction_l2_is_per_image_not_per_pixel():
    images = torch.rand(4, 3, 5, 5) * 2 - 1
    recon = lambda x: x + 0.5  # noqa: E731  every pixel off by 0.5: ||.||_2 = 0.5 * sqrt(75)
    assert reconstruction_l2(recon, images, batch_size=3) == pytest.approx(0.5 * 75 ** 0.5, rel=1e-6)
    assert reconstruction_l2(lambda x: x.clone(), images) == 0.0
    with pytest.raises(ValueError, match="reconstruct must return the input's shape"):
        reconstruction_l2(lambda x: x[:, :1], images)
