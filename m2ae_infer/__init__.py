"""m2ae-infer: local-motion deblurring that computes only where the picture is blurred."""
from .api import Deblurrer, RunInfo
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import M2AEConfig
from .imgio import ImageError, ImageWarning
from .imgsave import save_image
from .model import M2AENet
from .reparam import reparameterize_model

__all__ = ["Deblurrer", "RunInfo", "M2AEConfig", "M2AENet", "reparameterize_model", "load_checkpoint",
           "save_checkpoint", "CheckpointError", "ImageError", "ImageWarning", "save_image"]
__version__ = "0.1.0"
