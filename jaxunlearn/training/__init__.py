"""Ensemble training: one pure train_step, vmapped over a stacked pytree of models."""
from jaxunlearn.training.ensemble import EnsembleFns, model_keys, train_ensemble
from jaxunlearn.training.recipe import RECIPES, Recipe, load_recipe, make_optimizer
from jaxunlearn.training.run import RunConfig, load_chunk_variables, load_run, train_run
from jaxunlearn.training.step import ModelState, Trainer, make_trainer
from jaxunlearn.training.subsets import random_subset_masks, retain_masks

__all__ = ["EnsembleFns", "model_keys", "train_ensemble", "RECIPES", "Recipe", "load_recipe", "make_optimizer",
           "RunConfig", "train_run", "load_run", "load_chunk_variables", "ModelState", "Trainer", "make_trainer",
           "random_subset_masks", "retain_masks"]
