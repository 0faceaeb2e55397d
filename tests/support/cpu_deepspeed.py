"""DeepSpeed on CPU processes over gloo, for tests only.

Lightning's ``DeepSpeedStrategy`` refuses anything but CUDA devices; DeepSpeed itself runs its
ZeRO optimizers on CPU tensors and falls back to gloo for communication. This subclass skips
Lightning's two CUDA-only checks (the accelerator type and the device-index check) so ZeRO
sharding and resumption can be tested on CI's CPUs.
"""

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """``DeepSpeedStrategy`` that accepts the CPU accelerator."""

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _get_process_group_backend(self) -> str:
        return "gloo"

    @property
    def root_device(self) -> torch.device:
        # DeepSpeed reads the device index as the local rank; a CPU device has none by default.
        return torch.device("cpu", self.local_rank)
