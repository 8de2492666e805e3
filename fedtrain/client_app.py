"""The node's training code as a Flower ``ClientApp``.

The same app runs under fedtrain's node agent (which adds policy, ledger and
audit around it) and under Flower's simulation engine. It reads the job spec from
``context.run_config["job-spec"]`` and the local table from
``context.node_config["data-path"]``; nothing but the DP-trained tensors (all
parameters of a tabular model, only the adapter of a transformer), the example
count and the DP parameters (noise, sample rate, steps) goes into its reply.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtrain.models import build_model, load_dataset, load_trainable_state, trainable_state
from fedtrain.privacy.accounting import plan_round
from fedtrain.privacy.engine import train_private
from fedtrain.spec import job_spec_from_json

log = logging.getLogger("fedtrain.node")
app = ClientApp()


def arrays_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: arr.numpy() for name, arr in record.items()}


def numpy_to_arrays(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict={name: Array(np.ascontiguousarray(a)) for name, a in arrays.items()})


@app.train()
def train(msg: Message, context: Context) -> Message:
    spec = job_spec_from_json(str(context.run_config["job-spec"]))
    dataset = load_dataset(str(context.node_config["data-path"]), spec)
    model = build_model(spec)
    load_trainable_state(model, arrays_to_numpy(msg.content["arrays"]))
    mu = float(msg.content["config"].get("proximal-mu", 0.0))
    result = train_private(model, dataset, spec, plan_round(spec, len(dataset)), proximal_mu=mu)
    # The training loss is a statistic of the private data without noise: it is logged
    # here, on the node, and never put into the reply.
    log.info("round %s: local DP-SGD training loss %.4f", msg.content["config"].get("server-round"), result.loss)
    metrics = MetricRecord(
        {
            # Flower's strategies weight the average by this key.
            "num-examples": len(dataset),
            "noise-multiplier": result.plan.noise_multiplier,
            "sample-rate": result.plan.sample_rate,
            "steps": result.plan.steps,
        }
    )
    content = RecordDict({"arrays": numpy_to_arrays(trainable_state(model)), "metrics": metrics})
    return Message(content, reply_to=msg)
