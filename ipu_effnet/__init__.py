"""ipu_effnet: EfficientNet training for Graphcore IPUs and plain PyTorch (G16 grouped convolutions,
GroupNorm/LayerNorm/Proxy Norm, half-resolution training with full-resolution fine-tuning)."""

__version__ = "0.1.0"
