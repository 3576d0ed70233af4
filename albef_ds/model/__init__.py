"""nn.Modules: ViT, text/fusion encoders, the ALBEF pre-training module and its losses.

Single-device code: no deepspeed, no torch.distributed (the queue's gather is injected).
"""

from .albef import ALBEFPretrain, PretrainOutput, identity_gather

__all__ = ["ALBEFPretrain", "PretrainOutput", "identity_gather"]
