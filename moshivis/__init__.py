"""MoshiVis: config, checkpoints, the PyTorch reference and the streaming engine."""
from .checkpoint import CheckpointError, load, random_init, save
from .config import ConfigError, MoshiVisConfig, preset
from .engine import Engine, SamplingParams, StreamError
from .image_pool import ImageError

__all__ = ["CheckpointError", "ConfigError", "Engine", "ImageError", "MoshiVisConfig", "SamplingParams",
           "StreamError", "load", "preset", "random_init", "save"]
