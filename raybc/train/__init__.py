"""Training: the paper's eight methods and raybc's bc-aligner-warm, their losses, and the Ray Train loop.

- ``methods``: what each method trains and which backward map it publishes.
- ``losses``: BPR and the single-step / multi-step / prefix alignment losses.
- ``loop``: the per-worker training loop (Ray Train, DDP over edge shards, safetensors checkpoints).
- ``fit``: ``TrainOptions`` (the authors' setup by default; docs/results.md lists every difference)
  and fitting one version with a TorchTrainer, then publishing it and writing z_k.
"""

from raybc.train.methods import METHODS, Method

__all__ = ["METHODS", "Method"]
