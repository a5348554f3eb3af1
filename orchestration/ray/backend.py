"""Ray Train's torch backend with the socket interfaces picked first.

Ray Train's `_TorchBackend.on_start` sets MASTER_ADDR and calls `init_process_group` on every
worker itself, before our train loop runs: the interface choice
(`orchestration.network.pick_for_ray_worker`) has to run on each worker before that, so it
runs at the start of `on_start` (ray 2.60: `BackendSetupCallback.after_execution_group_start`).
"""
from __future__ import annotations

from dataclasses import dataclass

from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend

from orchestration.network import pick_for_ray_worker


class _InterfacesFirst(_TorchBackend):
    def on_start(self, worker_group, backend_config):
        worker_group.execute(pick_for_ray_worker)
        super().on_start(worker_group, backend_config)


@dataclass
class LznTorchConfig(TorchConfig):
    """TorchConfig whose backend sets GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME on each worker
    (where unset) to the interface of its Ray node IP before the process group starts."""

    @property
    def backend_cls(self):
        return _InterfacesFirst
