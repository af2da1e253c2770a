"""The classifier every stage trains lives in the pruning library (pruning/classifier.py); re-exported here."""
from pruning.classifier import IMAGENET_MEAN, IMAGENET_STD, ImageClassifier

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ImageClassifier"]
