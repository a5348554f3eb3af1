"""Tiny stand-ins for encoders and decoders, for tests of the loop and the objectives."""
import torch
from torch import nn


class ToyEncoder(nn.Module):
    def __init__(self, pixels: int = 16, latent_dim: int = 3):
        super().__init__()
        self.body = nn.Linear(pixels, 8)
        self.head = nn.Linear(8, latent_dim)

    def features(self, x):
        return torch.tanh(self.body(x.flatten(1)))

    def forward(self, x):
        return self.head(self.features(x))


class ToyDecoder(nn.Module):
    """v(x_t, t, cond) for (B, 1, 4, 4) images."""

    def __init__(self, cond_dim: int = 3):
        super().__init__()
        self.cond_dim = cond_dim
        self.net = nn.Linear(16 + 1 + cond_dim, 16)

    def forward(self, x, t, cond):
        parts = [x.flatten(1), t[:, None]] + ([cond] if self.cond_dim else [])
        return self.net(torch.cat(parts, dim=1)).view_as(x)


def toy_images(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 4, 4, generator=g) * 2 - 1, torch.randint(0, 4, (n,), generator=g)
