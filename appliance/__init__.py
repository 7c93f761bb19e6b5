"""appliance: quantized local fine-tuning and serving for one consumer GPU."""

__version__ = "0.1.0"
