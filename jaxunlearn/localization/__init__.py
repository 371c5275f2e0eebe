"""Localization masks (DEL, SalUn saliency, random, memorization, whole model): see masks.py."""
from jaxunlearn.localization.masks import (CHANNEL_REDUCES, MASKS, MaskConfig, channel_scores, del_mask,
                                           forget_gradient, get_mask, mask_fraction_of, memorization_mask,
                                           random_mask, saliency_mask, top_fraction, whole_mask)

__all__ = ["CHANNEL_REDUCES", "MASKS", "MaskConfig", "channel_scores", "del_mask", "forget_gradient", "get_mask",
           "mask_fraction_of", "memorization_mask", "random_mask", "saliency_mask", "top_fraction", "whole_mask"]
