"""Data attribution: linear datamodels (ridge, lasso), subsampling influence, LDS, forget-set effects."""
from jaxunlearn.attribution.datamodels import (Datamodels, fit_lasso, fit_ridge, lasso_forget_effect, lds,
                                               ridge_forget_effects, spearman)
from jaxunlearn.attribution.effects import ESTIMATORS, auto_threshold, forget_set_effects
from jaxunlearn.attribution.influence import (influence_estimates, influence_forget_effects, influence_lds,
                                              select_influence_threshold)

__all__ = ["Datamodels", "fit_ridge", "fit_lasso", "lasso_forget_effect", "lds", "ridge_forget_effects", "spearman",
           "ESTIMATORS", "auto_threshold", "forget_set_effects", "influence_estimates", "influence_forget_effects",
           "influence_lds", "select_influence_threshold"]
