"""S5 on real edge devices: a Flower (1.42, Message API) backend.

common.py      run config -> settings, data and model; state dicts <-> ArrayRecords
server_app.py  the ServerApp: branch-aware strategy (one message per node with only its
               branch's arrays), depth-aware aggregation, server-side validation, checkpoints
replies.py     the checks of a node's training reply (untrusted: checked and bounded before decoding)
client_app.py  the ClientApp: loads its partition, trains its branch, replies with the branch

Importing this package does not import flwr; import ``server_app`` / ``client_app`` for the apps.
See examples/flower_deployment/README.md for a SuperLink + SuperNodes deployment.
"""

from nni_fedexit.federated.backends.flower.common import build_model, load_branch_state, settings_from_config, to_array_record, to_state_dict

__all__ = ["build_model", "load_branch_state", "settings_from_config", "to_array_record", "to_state_dict"]
