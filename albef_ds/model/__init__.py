"""nn.Modules: ViT, text/fusion encoders, the reusable parts (momentum pairs, feature queue), the ALBEF task
modules composed from them, and their losses.

Single-device code: no deepspeed, no torch.distributed (the queue's gather is injected).
"""

from .albef import ALBEFPretrain, PretrainOutput
from .encoders import build_encoders, build_text_encoder, clamped_temp, encode_image, encode_text
from .momentum import MomentumPairs, momentum_autocast, params_to_buffers
from .ops import SECTION_NAMES, PretrainOps, Sections, no_sections
from .queue import NO_ID, AllGather, FeatureQueue, identity_gather

__all__ = [
    "NO_ID",
    "SECTION_NAMES",
    "ALBEFPretrain",
    "AllGather",
    "FeatureQueue",
    "MomentumPairs",
    "PretrainOps",
    "PretrainOutput",
    "Sections",
    "build_encoders",
    "build_text_encoder",
    "clamped_temp",
    "encode_image",
    "encode_text",
    "identity_gather",
    "momentum_autocast",
    "no_sections",
    "params_to_buffers",
]
