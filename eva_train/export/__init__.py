"""Weights out and in: ZeRO shards -> one safetensors file in our / timm / open_clip / mmpretrain names
(consolidate, layouts, torch_zip reader, safetensors writer), foreign weights in (weights), features out (inference)."""
