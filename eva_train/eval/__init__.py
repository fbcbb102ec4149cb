"""Evaluation: kNN monitor during pretraining, linear probe, fine-tuning, prediction.

Modules import torch lazily where they can so that `eva_train.eval` stays cheap to import.
"""
