"""m2ae-infer: local-motion deblurring that computes only where the picture is blurred."""
from .config import M2AEConfig
from .model import M2AENet
from .reparam import reparameterize_model

__all__ = ["M2AEConfig", "M2AENet", "reparameterize_model"]
__version__ = "0.1.0"
