"""Metrics: margins, accuracies, KLoM, membership inference, memorization, tug-of-war, Unrolling SGD's
verification and unlearning error."""
from jaxunlearn.metrics.klom import binned_kl, klom, klom_groups, klom_half_sample_spread, klom_summary
from jaxunlearn.metrics.margins import accuracy_from_logits, margins_from_logits
from jaxunlearn.metrics.memorization import accuracy_gaps, memorization, tug_of_war
from jaxunlearn.metrics.mia import lira_scores, mia, roc_auc, tpr_at_fpr
from jaxunlearn.metrics.unrolling import top_hessian_eigenvalue, unlearning_error, verification_error

__all__ = ["accuracy_from_logits", "margins_from_logits", "binned_kl", "klom", "klom_groups", "klom_half_sample_spread",
           "klom_summary", "lira_scores", "mia", "roc_auc", "tpr_at_fpr", "memorization", "accuracy_gaps", "tug_of_war",
           "top_hessian_eigenvalue", "unlearning_error", "verification_error"]
