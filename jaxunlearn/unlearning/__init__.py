"""Unlearning methods: one shared signature (see base.py), one file each, all named in registry.py."""
from jaxunlearn.unlearning.base import UnlearnData, unlearn_ensemble, unlearn_grid
from jaxunlearn.unlearning.dm_direct import dm_direct, dm_direct_targets, forget_effect
from jaxunlearn.unlearning.ga import GAConfig, gradient_ascent
from jaxunlearn.unlearning.gd import GDConfig, finetune_retain
from jaxunlearn.unlearning.l1_sparse import L1SparseConfig, l1_sparse
from jaxunlearn.unlearning.neggrad_plus import NegGradPlusConfig, neggrad_plus
from jaxunlearn.unlearning.oracle_matching import DMMConfig, MatchingConfig, OracleMatchingConfig, dmm, oracle_matching
from jaxunlearn.unlearning.random_labels import RandomLabelsConfig, random_labels
from jaxunlearn.unlearning.registry import ALL_METHODS, METHODS, config_dict, get_method, make_config, parse_grid
from jaxunlearn.unlearning.salun import SalUnConfig, salun, salun_mask
from jaxunlearn.unlearning.scrub import SCRUBConfig, scrub
from jaxunlearn.unlearning.single_gradient import SingleGradientConfig, single_gradient

__all__ = ["UnlearnData", "unlearn_ensemble", "unlearn_grid", "dm_direct", "dm_direct_targets", "forget_effect",
           "MatchingConfig", "OracleMatchingConfig", "DMMConfig", "dmm",
           "oracle_matching", "GAConfig", "gradient_ascent", "GDConfig", "finetune_retain", "NegGradPlusConfig",
           "neggrad_plus", "SCRUBConfig", "scrub", "RandomLabelsConfig", "random_labels", "SalUnConfig", "salun",
           "salun_mask", "SingleGradientConfig", "single_gradient", "L1SparseConfig", "l1_sparse", "ALL_METHODS",
           "METHODS", "config_dict", "get_method",
           "make_config", "parse_grid"]
