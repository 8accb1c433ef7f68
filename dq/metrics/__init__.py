"""FID / IS (torchmetrics) on classifier or Inception features, PSNR to the teacher's samples."""

from dq.metrics.classifier import MNISTClassifier
from dq.metrics.fid_is import SampleMetrics, psnr

__all__ = ["MNISTClassifier", "SampleMetrics", "psnr"]
