"""Run planning: what a recipe costs on a cluster before it is queued (memory per GPU, ZeRO traffic,
throughput, wall-clock and GPU-hours), from the one GPU table in `gpus.py`.

Import direction: runtime, models, config <- plan <- train (metrics reads the GPU table) <- pretrain.
"""
