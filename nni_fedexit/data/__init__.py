"""S2: image data, the server's search split and the clients' partitions.

datasets.py  Fashion-MNIST, CIFAR and digits loaders, device image folders, data roles,
             client partitioners (IID, Dirichlet, shards)
"""

from typing import TYPE_CHECKING

from nni_fedexit.lazy import lazy_exports

if TYPE_CHECKING:  # the public names; each module is imported when one of its names is first used
    from nni_fedexit.data.datasets import (
        DATASETS, FASHION_MNIST_SYSTEM_DIR, DataBundle, DataError, DataRoles, ImageData, label_skew, load_dataset,
        load_image_folder, partition, partition_dirichlet, partition_iid, partition_shards, save_image_folder,
        split_roles, standardise,
    )

__all__ = ["DATASETS", "FASHION_MNIST_SYSTEM_DIR", "DataBundle", "DataError", "DataRoles", "ImageData", "label_skew",
           "load_dataset", "load_image_folder", "partition", "partition_dirichlet", "partition_iid",
           "partition_shards", "save_image_folder", "split_roles", "standardise"]

__getattr__, __dir__ = lazy_exports(__name__, __file__)
