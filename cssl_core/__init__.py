"""cssl_core: the engine of cssl, usable in a notebook with no server running.

Public names are re-exported here so a reader learns the API from one file. This package
never imports prefect, mlflow or ``pipelines`` (a test enforces it).
"""

from cssl_core.config import ConfigError, Params, load_params
from cssl_core.images import DecodeLimits, ImageRejected, decode_image, encode_jpeg, frame_id
from cssl_core.shard import FRAME_SCHEMA, Frame, Shard, ShardError, ShardWriter, list_shards

__all__ = [
    "FRAME_SCHEMA",
    "ConfigError",
    "DecodeLimits",
    "Frame",
    "ImageRejected",
    "Params",
    "Shard",
    "ShardError",
    "ShardWriter",
    "decode_image",
    "encode_jpeg",
    "frame_id",
    "list_shards",
    "load_params",
]

__version__ = "0.1.0"
