"""Loading diffusers models and sampling them."""

from dq.models.loading import load_teacher
from dq.models.sampling import ddim_sample, make_noise

__all__ = ["ddim_sample", "load_teacher", "make_noise"]
