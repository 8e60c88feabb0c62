"""Evaluation: online probe, kNN, offline linear probe, benchmark runner."""

from ssl_modules.evaluation.knn import knn_predict
from ssl_modules.evaluation.probe import LinearProbe, extract_features, fit_linear_probe
from ssl_modules.evaluation.self_supervised import SelfSupervisedModule

__all__ = ["LinearProbe", "SelfSupervisedModule", "extract_features", "fit_linear_probe", "knn_predict"]
