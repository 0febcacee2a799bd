"""Modules: the parameter registry (``Module``, ``Parameter``) and the layers a GPT is made of."""

from minilora.nn.layers import Dropout, Embedding, LayerNorm, Linear, make_rng
from minilora.nn.module import LoadResult, Module, ModuleList, Parameter

__all__ = ["Dropout", "Embedding", "LayerNorm", "Linear", "LoadResult", "Module", "ModuleList",
           "Parameter", "make_rng"]
