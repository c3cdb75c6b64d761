"""The GliTr model (Rangrej et al., "GliTr: Glimpse Transformers with Spatiotemporal Consistency for
Online Action Prediction", WACV 2023): T_f encodes one glimpse per frame, T_c predicts the class and T_l
where to look next, trained from a full-frame teacher.
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
