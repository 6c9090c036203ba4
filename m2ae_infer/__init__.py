"""m2ae-infer: local-motion deblurring that computes only where the picture is blurred."""
from .api import Deblurrer, RunInfo
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import M2AEConfig
from .imgio import ImageError
from .model import M2AENet
from .reparam import reparameterize_model

__all__ = ["Deblurrer", "RunInfo", "M2AEConfig", "M2AENet", "reparameterize_model", "load_checkpoint",
           "save_checkpoint", "CheckpointError", "ImageError"]
__version__ = "0.1.0"
