"""LZN, the model library, in plain PyTorch.

Everything that is Latent Zoning Networks and nothing that is infrastructure: the
latent-zoning math (`lzn.zoning`, with its solvers in `lzn.solvers`), the autograd-aware
collectives injected into it (`lzn.distributed`), and, as the case studies land, the
encoders and decoders, objectives, the one training loop, samplers, datasets and metrics.
`lzn` imports torch, torchvision, torchmetrics, numpy, scipy and pyarrow only: never Ray,
MLflow, Hydra or submitit, so it runs the same under torchrun, Ray Train or a notebook.
"""
