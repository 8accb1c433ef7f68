"""dq: low-bit quantization of diffusion models with DilateQuant."""

__version__ = "0.1.0"
