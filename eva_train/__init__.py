"""eva-train: masked image modeling pretraining of EVA vision transformers."""

__version__ = "0.1.0"
