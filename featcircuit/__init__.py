"""featcircuit: paired sparse dictionaries on the residual stream and the MLP of one layer,
linked feature to feature by exact activation×gradient attribution and ablation search."""

from .activations import harvest
from .data import load_tokens
from .errors import UserError
from .models import BUILTIN_NAME, load_model, model_info
from .sites import MLPParts, Site, mlp_parts, pair_sites, resolve_site

__version__ = "0.1.0"

__all__ = [
    "BUILTIN_NAME", "MLPParts", "Site", "UserError", "harvest", "load_model", "load_tokens",
    "mlp_parts", "model_info", "pair_sites", "resolve_site",
]
