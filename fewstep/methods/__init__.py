"""Distillation methods. Each file holds one method's pure losses and its class."""
from .base import METHODS, DataInfo, Method, Phase, get_method, register_method

__all__ = ["METHODS", "DataInfo", "Method", "Phase", "get_method", "register_method"]
