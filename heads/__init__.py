"""Predictors trained on a frozen embedding cache (logistic regression, LightGBM, attention pooling) and
fine-tuned language models, in scikit-learn's conventions.

``heads.base`` holds the interface, ``heads.registry`` every head by name (``make_head``),
``heads.training`` the training loop of the torch heads.
"""
