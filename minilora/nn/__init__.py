"""Modules: the parameter registry (``Module``, ``Parameter``) and the layers models are made of."""

from minilora.nn.checkpoint import checkpoint, checkpoint_module
from minilora.nn.layers import Dropout, Embedding, LayerNorm, Linear, make_rng
from minilora.nn.module import LoadResult, Module, ModuleList, Parameter
from minilora.nn.rms_norm import RMSNorm

__all__ = ["Dropout", "Embedding", "LayerNorm", "Linear", "LoadResult", "Module", "ModuleList",
           "Parameter", "RMSNorm", "checkpoint", "checkpoint_module", "make_rng"]
