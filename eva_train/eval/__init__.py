"""Evaluation: kNN monitor during pretraining, linear probe, fine-tuning, prediction.

Shares the data pipeline's decoders and its one evaluation preprocessing (data/transforms.py), the
training side's schedule, weight-decay rule (optim/) and process-group set-up (runtime/).
"""
