"""Data attribution: linear datamodels (ridge, lasso) and their LDS."""
from jaxunlearn.attribution.datamodels import (Datamodels, fit_lasso, fit_ridge, lasso_forget_effect, lds,
                                               ridge_forget_effects, spearman)

__all__ = ["Datamodels", "fit_ridge", "fit_lasso", "lasso_forget_effect", "lds", "ridge_forget_effects", "spearman"]
