"""Predictors trained on a frozen embedding cache (logistic regression, LightGBM, attention pooling)."""
