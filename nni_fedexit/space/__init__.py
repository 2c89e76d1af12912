"""S1: the search space: residual-block pools cropped out of several timm ResNets (claim 2).

block_pool.py  SpaceSpec, the block pools and ResNetBlockPoolSpace (an NNI ModelSpace)
architecture.py  architecture_label: a sample as people read it
nni_json.py    the same space as a classic NNI search-space JSON (for nnictl and its tuners)
"""

from typing import TYPE_CHECKING

from nni_fedexit.lazy import lazy_exports

if TYPE_CHECKING:  # the public names; each module is imported when one of its names is first used
    from nni_fedexit.space.block_pool import (
        BlockCrop, ResNetBlockPoolSpace, SpaceSpec, SpecError, load_space_spec,
    )
    from nni_fedexit.space.architecture import architecture_label
    from nni_fedexit.space.nni_json import to_nni_search_space, write_nni_search_space

__all__ = ["BlockCrop", "ResNetBlockPoolSpace", "SpaceSpec", "SpecError", "architecture_label", "load_space_spec",
           "to_nni_search_space", "write_nni_search_space"]

__getattr__, __dir__ = lazy_exports(__name__, __file__)
