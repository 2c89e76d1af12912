"""S2: image data, the server's search split and the clients' partitions.

datasets.py  Fashion-MNIST, CIFAR and digits loaders, device image folders, data roles,
             client partitioners (IID, Dirichlet, shards)
"""

from nni_fedexit.data.datasets import (
    DATASETS, FASHION_MNIST_SYSTEM_DIR, DataBundle, DataError, DataRoles, ImageData, label_skew, load_dataset,
    load_image_folder, partition, partition_dirichlet, partition_iid, partition_shards, save_image_folder,
    split_roles, standardise,
)

__all__ = ["DATASETS", "FASHION_MNIST_SYSTEM_DIR", "DataBundle", "DataError", "DataRoles", "ImageData", "label_skew",
           "load_dataset", "load_image_folder", "partition", "partition_dirichlet", "partition_iid",
           "partition_shards", "save_image_folder", "split_roles", "standardise"]
