"""Metrics: margins, accuracies, KLoM, membership inference."""
from jaxunlearn.metrics.margins import accuracy_from_logits, margins_from_logits

__all__ = ["accuracy_from_logits", "margins_from_logits"]
