"""Importance criteria and pruning drivers.

Public entry point for users who bring their own model:

    from pruners import parameter_scores
    scores = parameter_scores("OBA", model, batches, criterion=torch.nn.CrossEntropyLoss())
    # {parameter name: tensor of that parameter's shape}, averaged over the batches
"""
from .registry import (CriterionError, Method, available_methods, get_method,  # noqa: F401
                       parameter_scores, register)
