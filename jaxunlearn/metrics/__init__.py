"""Metrics: margins, accuracies, KLoM, membership inference, Unrolling SGD's verification/unlearning error."""
from jaxunlearn.metrics.klom import binned_kl, klom, klom_groups, klom_summary
from jaxunlearn.metrics.margins import accuracy_from_logits, margins_from_logits
from jaxunlearn.metrics.mia import lira_scores, mia, roc_auc, tpr_at_fpr
from jaxunlearn.metrics.unrolling import top_hessian_eigenvalue, unlearning_error, verification_error

__all__ = ["accuracy_from_logits", "margins_from_logits", "binned_kl", "klom", "klom_groups", "klom_summary",
           "lira_scores", "mia", "roc_auc", "tpr_at_fpr", "top_hessian_eigenvalue", "unlearning_error",
           "verification_error"]
