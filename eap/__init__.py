"""eap: the edge graph of a transformer and fast gradient edge attribution.

Sign and units everywhere: score(edge) ~= mean over prompts of metric(edge patched) - metric(clean),
in the metric's units ("noising": corrupted - clean sender difference, gradient on the clean run).
"""

from eap.arch import UnsupportedModel
from eap.graph import Graph, GraphError, GraphSpec
from eap.models import ModelLoadError, embedded_names, load_model, random_model
from eap.task import Task, TaskError
from eap import tasks
from eap.attribute import METHODS, attribute
from eap.methods import REGISTRY, Method, get_method, register

__all__ = [
    "Graph", "GraphError", "GraphSpec", "ModelLoadError", "Task", "TaskError", "METHODS", "UnsupportedModel",
    "Method", "REGISTRY", "attribute", "embedded_names", "get_method", "register", "load_model", "random_model", "tasks",
]
