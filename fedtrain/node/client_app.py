"""The node's private round as a Flower ``ClientApp``, for Flower's simulation engine.

A thin adapter over :class:`fedtrain.node.round.PrivateRound`, the entry point the node
agent trains through too. It reads the job spec from ``context.run_config["job-spec"]``
and the local table from ``context.node_config["data-path"]``, strictly: a rehearsal's
data is its operator's, who needs to hear what is wrong with it (a node agent skips bad
rows and tells only its owner). The partition's size stands for the size a data owner's
policy declares, and there is no ledger: a rehearsal spends nobody's budget.
Nothing but the DP-trained tensors (all parameters of a tabular model, only the adapter
of a transformer), the declared example count and the DP parameters (noise, sample rate,
steps) goes into its reply.
"""

from __future__ import annotations

import logging

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtrain.models import load_dataset
from fedtrain.node.round import PrivateRound
from fedtrain.node.training import training_device
from fedtrain.protocol.records import arrays_to_numpy, numpy_to_arrays
from fedtrain.spec import job_spec_from_json

log = logging.getLogger("fedtrain.node")
app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    spec = job_spec_from_json(str(context.run_config["job-spec"]))
    dataset = load_dataset(str(context.node_config["data-path"]), spec)
    private = PrivateRound(spec, len(dataset), training_device(spec.training.device, ["cpu", "cuda"]))
    update = private.train(dataset, arrays_to_numpy(msg.content["arrays"]))
    # The training loss is a statistic of the private data without noise: it is logged
    # here, on the node, and never put into the reply.
    log.info("round %s: local DP-SGD training loss %.4f", msg.content["config"].get("server-round"), update.loss)
    metrics = MetricRecord(private.metrics(num_examples=True))
    return Message(RecordDict({"arrays": numpy_to_arrays(update.arrays), "metrics": metrics}), reply_to=msg)
