"""Model factory (torchvision architectures, weights), the classifier wrapper and FLOP counting."""
from .classifier import ImageClassifier
from .factory import (MODEL_NAMES, ModelError, build_backbone, classifier_name, count_parameters, has_weights,
                      is_torchvision_weights, weights_num_classes)
from .flops import count_macs, flop_counter, weight_macs

__all__ = ["ImageClassifier", "MODEL_NAMES", "ModelError", "build_backbone", "classifier_name",
           "count_parameters", "count_macs", "flop_counter", "has_weights", "is_torchvision_weights",
           "weight_macs", "weights_num_classes"]
