"""S2 for S5: the server's validation and training splits, the test set and every client's partition, loaded once."""

from __future__ import annotations

import numpy as np
import torch

from nni_fedexit.data import DataBundle, label_skew, load_dataset, partition, split_roles
from nni_fedexit.federated.settings import FederatedSettings

__all__ = ["FederatedData"]


class FederatedData:
    """The server's validation and training splits, the test set, and every client's partition, loaded once."""

    def __init__(self, settings: FederatedSettings, bundle: DataBundle | None = None):
        s = settings
        self.bundle = bundle or load_dataset(s.dataset, data_dir=s.data_dir)
        train = self.bundle.train
        roles = split_roles(len(train), s.server_fraction, s.val_fraction, seed=s.seed)
        pool = roles.clients
        if s.client_samples is not None:
            pool = np.sort(np.random.default_rng(s.seed).permutation(pool)[: s.client_samples])
        labels = train.labels.numpy()[pool]
        parts = partition(labels, s.num_clients, s.partition, seed=s.seed, alpha=s.alpha,
                          classes_per_client=s.classes_per_client)
        self.clients = [train.subset(pool[p]) for p in parts]
        self.val = train.subset(roles.search_val[: s.val_samples])
        #: the server's own training images (S2), for BatchNorm re-estimation (``bn_stats``)
        self.server_train = train.subset(roles.search_train[: s.bn_samples])
        #: the first of them, with their labels, for the server's training steps (``server_steps``)
        self.server_labelled = train.subset(roles.search_train[: s.server_images(len(roles.search_train))])
        test = self.bundle.test
        self.test = test if s.test_samples is None else test.subset(np.arange(min(s.test_samples, len(test))))
        self.label_skew = label_skew(labels, parts)
        num_classes = self.bundle.num_classes
        self.summary = [
            {"client": i, "samples": len(c), "labels": torch.bincount(c.labels, minlength=num_classes).tolist()}
            for i, c in enumerate(self.clients)
        ]
