"""FID / IS (torchmetrics) on classifier or Inception features, PSNR to the teacher's samples, SQNR of outputs."""

from dq.metrics.classifier import MNISTClassifier
from dq.metrics.fid_is import SampleMetrics, non_finite_count, psnr, sqnr_db

__all__ = ["MNISTClassifier", "SampleMetrics", "non_finite_count", "psnr", "sqnr_db"]
