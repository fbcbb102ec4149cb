"""Optimization pieces shared by pretraining and evaluation: the learning-rate schedule and the
weight-decay rule."""
