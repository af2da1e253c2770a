"""Data: the synthetic default set, ImageFolder trees, FFCV .beton writing and loaders."""
from . import ffcv_import  # noqa: F401  (first: FFCV without its import-time numba compile)
from .imagefolder import DataError, scan_image_folder, split_per_class
from .loaders import TrainLoader, val_loader
from .prepare import DataFiles, prepare_data, prepare_eval_data

__all__ = ["DataError", "DataFiles", "TrainLoader", "prepare_data", "prepare_eval_data",
           "scan_image_folder", "split_per_class", "val_loader"]
