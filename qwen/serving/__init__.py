"""The serving engine every front end shares (see engine.py)."""

from .engine import Engine, RequestStream, join_outputs
from .params import EngineBusy, Output, RequestError, SamplingParams, TokenLogprob

__all__ = ["Engine", "EngineBusy", "Output", "RequestError", "RequestStream", "SamplingParams", "TokenLogprob", "join_outputs"]
