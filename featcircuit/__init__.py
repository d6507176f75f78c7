"""featcircuit: paired sparse dictionaries on the residual stream an MLP reads and its mid-MLP
activations, at one layer or every layer, linked feature to feature (through the nonlinearity and
between layers) by exact activation×gradient attribution and validated by ablation search."""

from .ablation import AblationContext, Config
from .activations import harvest
from .attribution import EdgeTable, attribute_edges, node_effects
from .data import load_tokens
from .dictionary import DictConfig, Dictionary, Pair, load_pair, save_pair
from .discover import DiscoverConfig, discover
from .errors import UserError
from .evaluation import evaluate_pair
from .faithfulness import curves, end_points
from .graph import CircuitGraph
from .models import BUILTIN_NAME, load_model, model_info
from .pairs import default_pair
from .replacement import Replacement, Trace
from .search import SearchResult, rank_edges, search_circuit
from .sites import MLPParts, Site, mlp_parts, pair_sites, resolve_site
from .tasks import TaskPrompts, builtin_task, load_prompts
from .training import TrainConfig, train_pair
from .weights import sufficiency, virtual_weights

__version__ = "0.1.0"

__all__ = [
    "BUILTIN_NAME", "AblationContext", "CircuitGraph", "Config", "DictConfig", "Dictionary",
    "DiscoverConfig", "EdgeTable", "MLPParts", "Pair", "Replacement", "SearchResult", "Site", "TaskPrompts",
    "Trace", "TrainConfig", "UserError", "attribute_edges", "builtin_task", "curves", "default_pair",
    "discover", "end_points", "evaluate_pair", "harvest", "load_model", "load_pair", "load_prompts",
    "load_tokens", "mlp_parts", "model_info", "node_effects", "pair_sites", "rank_edges", "resolve_site",
    "save_pair", "search_circuit", "sufficiency", "train_pair", "virtual_weights",
]
