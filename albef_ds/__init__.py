"""albef-ds: DeepSpeed-scaled pre-training and fine-tuning of ALBEF (Align before Fuse)."""

__version__ = "0.1.0"
