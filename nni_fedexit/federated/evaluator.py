"""S5: FederatedEvaluator, an NNI evaluator that trains the exit-point model on edge clients.

Given a network frozen from the block-pool space, :func:`federate` builds the
:class:`MultiExitNetwork` (S4) and hands the T rounds of claim 5 to the backend the settings name
(``simulation`` or ``flower``, both driving :class:`~nni_fedexit.federated.rounds.RoundEngine`);
then it loads the best round's weights, measures test accuracy per exit and reports to NNI.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from nni_fedexit.nni_compat import import_nni

nni = import_nni()  # before anything from NNI: its torch warnings quieted, its manager start and tuner errors patched
from nni.nas.evaluator import MutableEvaluator  # noqa: E402

from nni_fedexit.exits import ExitCost, MultiExitNetwork, ensemble_accuracy, exit_accuracies, exit_costs, exit_outputs
from nni_fedexit.federated.backends import get_backend
from nni_fedexit.federated.client_data import FederatedData
from nni_fedexit.federated.rounds import metric_dict, stable_seed
from nni_fedexit.federated.settings import FederatedSettings
from nni_fedexit.space import architecture_label

__all__ = ["FederatedResult", "FederatedEvaluator", "federate"]

_logger = logging.getLogger(__name__)


@dataclass
class FederatedResult:
    """A finished run: the best round's model, and everything measured on the way."""

    model: MultiExitNetwork
    best_round: int
    history: list[dict[str, Any]]
    test_accuracy: list[float]
    exit_costs: list[ExitCost]
    #: p_h: parameters of the network as searched (before exits replaced its head)
    params: int
    clients: list[dict[str, Any]] = field(default_factory=list)
    #: test accuracy of the ensemble of exits (the mean of their probabilities)
    ensemble_accuracy: float | None = None

    @property
    def best(self) -> dict[str, Any]:
        return self.history[self.best_round - 1]


def federate(
    network: nn.Module,
    settings: FederatedSettings,
    data: FederatedData | None = None,
    backend_factory: Callable[..., Any] | None = None,
    report: bool = True,
) -> FederatedResult:
    """Train the exit-point model of ``network`` for ``settings.rounds`` rounds on ``settings.backend``.

    ``network`` is a network frozen from the block-pool space (its exits are added here), or a
    :class:`MultiExitNetwork` to train further. ``backend_factory`` builds the in-process clients
    of the ``simulation`` backend (default :class:`~nni_fedexit.federated.backends.simulation.SimulationBackend`).
    """
    s = settings
    params = sum(p.numel() for p in network.parameters())
    if isinstance(network, MultiExitNetwork):  # continue training a given exit-point model
        model = network
    else:
        torch.manual_seed(stable_seed(s.seed, 0))  # the exits' initial weights
        model = MultiExitNetwork.from_network(network, head=s.head, head_width=s.head_width, loss_weights=s.loss_weights)
    model.to(s.device)
    data = data or FederatedData(s)
    costs = exit_costs(model, data.val.images[:1].to(s.device))

    def on_record(record: Mapping[str, Any]) -> None:
        if report:
            nni.report_intermediate_result(metric_dict(record))

    options = {"clients": backend_factory} if backend_factory is not None else {}
    run = get_backend(s.name("backend"))(model, s, data, costs, on_record, **options)
    model.load_state_dict(run.best_state)
    logits, labels = exit_outputs(model, data.test)
    test_accuracy = exit_accuracies(logits, labels)
    result = FederatedResult(model, run.best_round, run.history, test_accuracy, costs, params, run.clients,
                             ensemble_accuracy(logits, labels))
    if report:
        final: dict[str, Any] = metric_dict(run.history[run.best_round - 1])
        final.update({"params": float(params), "best_round": run.best_round})
        if model.arch:
            final["architecture"] = architecture_label(model.arch)
        final.update({f"test_exit{i + 1}": a for i, a in enumerate(test_accuracy)})
        final["test_ensemble"] = result.ensemble_accuracy
        nni.report_final_result(final)
    return result


@nni.trace
class FederatedEvaluator(MutableEvaluator):
    """An NNI evaluator: federated training of the exit-point model of the network it is given.

    Keyword arguments are :class:`FederatedSettings` fields. Use it as the evaluator of a
    ``NasExperiment`` (one trial per architecture, or the single trial of the final federated
    stage: the web UI draws one point per round), or from Python with :meth:`fit`.
    """

    def __init__(self, **settings: Any):
        self.settings = FederatedSettings(**settings)
        self.result: FederatedResult | None = None

    def extra_repr(self) -> str:
        s = self.settings
        return f"rounds={s.rounds}, num_clients={s.num_clients}, assignment={s.assignment!r}, partition={s.partition!r}"

    def fit(self, network: nn.Module, data: FederatedData | None = None, report: bool = True,
            backend_factory: Callable[..., Any] | None = None) -> FederatedResult:
        """Run the federated training (see :func:`federate`); returns the trained model and what was measured."""
        settings = self.settings
        if settings.checkpoint_dir is None and nni.get_trial_id() != "STANDALONE":
            out = os.environ.get("NNI_OUTPUT_DIR")
            if out:
                settings = settings.replace(checkpoint_dir=str(Path(out) / "federated"))
        self.result = federate(network, settings, data=data, backend_factory=backend_factory, report=report)
        return self.result

    def _execute(self, model: Any) -> Any:
        # NNI builds the trial's network right after this: seeded, its initial weights are those
        # of a deployment's ServerApp (backends.flower.common.build_model) and the same in every run
        torch.manual_seed(stable_seed(self.settings.seed))
        return super()._execute(model)

    def evaluate(self, model: nn.Module) -> FederatedResult:
        return self.fit(model)
