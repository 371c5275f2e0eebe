"""Metrics: margins, accuracies, KLoM, membership inference."""
from jaxunlearn.metrics.margins import accuracy_from_logits, margins_from_logits
from jaxunlearn.metrics.mia import lira_scores, mia, roc_auc, tpr_at_fpr

__all__ = ["accuracy_from_logits", "margins_from_logits", "lira_scores", "mia", "roc_auc", "tpr_at_fpr"]
