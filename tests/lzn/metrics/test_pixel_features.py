"""eval.fid_features=pixels: images -> their 8 x 8 area-averaged thumbnails."""
import numpy as np
import torch

from lzn.metrics.pixel_features import PixelFeatures


def test_features_are_block_means_of_the_pixels():
    x = torch.rand(3, 2, 16, 16) * 2 - 1
    want = x.numpy().reshape(3, 2, 8, 2, 8, 2).mean(axis=(3, 5)).reshape(3, -1)
    np.testing.assert_allclose(PixelFeatures()(x).numpy(), want, rtol=1e-6, atol=1e-6)


def test_images_up_to_8_px_are_their_own_pixels():
    x = torch.rand(4, 1, 6, 6)
    assert torch.equal(PixelFeatures()(x), x.flatten(1))
