"""The per-step batch metadata that the forker hands to the model forward."""

from typing import NamedTuple

import numpy as np


class StepMetadata(NamedTuple):
    """What one engine step needs to read and write paged KV.

    slot_mapping: int64 [N]      pool slot (block * block_size + offset) of each new token, batch order
    block_tables: int32 [B, W]   each sequence's blocks, padded with 0
    context_lens: int32 [B]      each sequence's length after this step's tokens
    copies:       int32 [K, 2]   (src, dst) block copies to run before this step's KV writes
    """

    slot_mapping: np.ndarray
    block_tables: np.ndarray
    context_lens: np.ndarray
    copies: np.ndarray
