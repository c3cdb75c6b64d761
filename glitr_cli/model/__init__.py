"""The GliTr model: glimpse transformers for online action prediction.

GliTr — Rangrej, Liang, Hassner, Clark, "GliTr: Glimpse Transformers with Spatiotemporal
Consistency for Online Action Prediction", WACV 2023. A spatial ViT (T_f) encodes one small
glimpse per frame; two causal temporal transformers read the history of glimpse features, one
predicting the class (T_c), the other where to look in the next frame (T_l). A teacher that
sees full frames supplies spatial (feature) and temporal (class distribution) targets.
"""

from glitr_cli.model.glimpse import extract_glimpse, glimpse_area_fraction, glimpse_mask, glimpse_theta
from glitr_cli.model.glitr import (
    GliTr,
    StudentObjective,
    StudentOutput,
    TeacherObjective,
    TeacherOutput,
    build_glitr,
    kl_divergence,
    step_cross_entropy,
)
from glitr_cli.model.online import OnlinePredictor, StepOutput
from glitr_cli.model.temporal import KVCache, Locator, TemporalTransformer

__all__ = [
    "GliTr",
    "KVCache",
    "Locator",
    "OnlinePredictor",
    "StepOutput",
    "StudentObjective",
    "StudentOutput",
    "TeacherObjective",
    "TeacherOutput",
    "TemporalTransformer",
    "build_glitr",
    "extract_glimpse",
    "glimpse_area_fraction",
    "glimpse_mask",
    "glimpse_theta",
    "kl_divergence",
    "step_cross_entropy",
]
