"""Unlearning methods: one shared signature (see base.py), one file each."""
from jaxunlearn.unlearning.base import UnlearnData, unlearn_ensemble
from jaxunlearn.unlearning.dm_direct import dm_direct, forget_effect
from jaxunlearn.unlearning.oracle_matching import MatchingConfig, dmm, oracle_matching

__all__ = ["UnlearnData", "unlearn_ensemble", "dm_direct", "forget_effect", "MatchingConfig", "dmm",
           "oracle_matching"]
