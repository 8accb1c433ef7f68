"""Data sets and DataModules."""

from dq.data.folder import load_image_folder
from dq.data.mnist import MNISTDataModule, load_mnist_split
from dq.data.reference import reference_images, reference_name

__all__ = ["MNISTDataModule", "load_image_folder", "load_mnist_split", "reference_images", "reference_name"]
