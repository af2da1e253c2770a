"""Model factory (torchvision architectures, weights), the classifier wrapper and FLOP counting."""
from .classifier import ImageClassifier
from .factory import MODEL_NAMES, ModelError, build_backbone, classifier_name, count_parameters, has_weights
from .flops import count_macs, flop_counter

__all__ = ["ImageClassifier", "MODEL_NAMES", "ModelError", "build_backbone", "classifier_name",
           "count_parameters", "count_macs", "flop_counter", "has_weights"]
