"""Training: the eight methods of the paper, their losses, and the Ray Train loop that fits them.

- ``methods``: what each method trains and which backward map it publishes.
- ``losses``: BPR and the single-step / multi-step / prefix alignment losses.
- ``loop``: the per-worker training loop (Ray Train, DDP over edge shards, safetensors checkpoints).
- ``fit``: fit one version with a TorchTrainer, then publish it and write z_k.
"""

from raybc.train.methods import METHODS, Method

__all__ = ["METHODS", "Method"]
