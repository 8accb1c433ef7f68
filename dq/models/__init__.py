"""Loading diffusers models and sampling them."""

from dq.models.loading import check_inference_steps, check_sample_shape, load_teacher
from dq.models.sampling import ddim_sample, make_noise

__all__ = ["check_inference_steps", "check_sample_shape", "ddim_sample", "load_teacher", "make_noise"]
