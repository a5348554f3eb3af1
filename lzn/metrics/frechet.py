"""The Fréchet distance between two Gaussians, vendored from torchmetrics.

`gaussian_frechet_distance` is `torchmetrics.image.fid._compute_fid` from torchmetrics
1.9.0 (src/torchmetrics/image/fid.py), copied so that a torchmetrics release that renames
or changes that private function cannot change our FIDs (pyproject bounds torchmetrics
from below only). Only the name, the docstring and the argument check are ours.

Copyright The Lightning team. Licensed under the Apache License, Version 2.0 (the
"License"); you may not use this file except in compliance with the License. You may
obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0. Unless
required by applicable law or agreed to in writing, software distributed under the
License is distributed on an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND,
either express or implied. See the License for the specific language governing
permissions and limitations under the License.
"""
from __future__ import annotations

import torch
from torch import Tensor


def gaussian_frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> Tensor:
    """d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), a scalar tensor.

    mu1, mu2: (d,); sigma1, sigma2: (d, d) covariances. Tr((S1 S2)^(1/2)) is the sum of the
    square roots of the eigenvalues of S1 S2 (real and >= 0 for covariances, up to round-off:
    hence the real part), so no matrix square root is formed. Pass float64 for FID.
    """
    d = mu1.shape[-1]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"the Fréchet distance needs means (d,) and covariances (d, d), got {tuple(mu1.shape)}, "
                         f"{tuple(sigma1.shape)}, {tuple(mu2.shape)}, {tuple(sigma2.shape)}")
    a = (mu1 - mu2).square().sum(dim=-1)
    b = sigma1.trace() + sigma2.trace()
    c = torch.linalg.eigvals(sigma1 @ sigma2).sqrt().real.sum(dim=-1)

    return a + b - 2 * c
