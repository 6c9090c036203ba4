"""The M2AENet network: blocks, mask predictor, motion analyzer, and the assembled model."""
from .network import M2AENet, TrainOutputs

__all__ = ["M2AENet", "TrainOutputs"]
