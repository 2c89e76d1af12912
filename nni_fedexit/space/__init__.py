"""S1: the search space: residual-block pools cropped out of several timm ResNets (claim 2).

block_pool.py  SpaceSpec, the block pools and ResNetBlockPoolSpace (an NNI ModelSpace)
nni_json.py    the same space as a classic NNI search-space JSON (for nnictl and its tuners)
"""

from nni_fedexit.space.block_pool import (
    BlockCrop, ResNetBlockPoolSpace, SpaceSpec, SpecError, architecture_label, load_space_spec,
)
from nni_fedexit.space.nni_json import to_nni_search_space, write_nni_search_space

__all__ = ["BlockCrop", "ResNetBlockPoolSpace", "SpaceSpec", "SpecError", "architecture_label", "load_space_spec",
           "to_nni_search_space", "write_nni_search_space"]
