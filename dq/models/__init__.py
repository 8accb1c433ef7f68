"""Loading diffusers models and sampling them."""

from dq.models.loading import check_inference_steps, check_sample_shape, check_unconditional, load_teacher
from dq.models.sampling import ddim_sample, make_noise

__all__ = [
    "check_inference_steps",
    "check_sample_shape",
    "check_unconditional",
    "ddim_sample",
    "load_teacher",
    "make_noise",
]
