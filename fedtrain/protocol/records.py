"""What a node's result holds besides its tensors, and Flower's ``ArrayRecord`` to numpy
arrays and back: the one place both sides convert."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Message, Metadata


def arrays_to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: arr.numpy() for name, arr in record.items()}


def numpy_to_arrays(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict={name: Array(np.ascontiguousarray(a)) for name, a in arrays.items()})


# The metrics of a result in the clear, exactly, with their types: the example count the
# node declares and the DP plan of the round's training, and the ledger's ε and δ that the
# node agent adds when it delivers (the job's own: a node's lifetime spend would tell of
# its other jobs). A masked result carries all but the example count.
# Replies whose keys differ would make Flower's strategies refuse the whole round.
RESULT_METRICS: dict[str, type] = {
    "num-examples": int, "noise-multiplier": float, "sample-rate": float, "steps": int,
    "epsilon": float, "delta": float,
}


def with_message_id(msg: Message, message_id: str) -> Message:
    """A copy of the instruction ``msg`` that carries ``message_id``, made with Flower's public
    constructors (a SuperLink assigns message ids on its own links; a fedtrain grid's are its
    task ids). Replies made with ``Message(..., reply_to=copy)`` name it as the message they answer."""
    m = msg.metadata
    metadata = Metadata(run_id=m.run_id, message_id=message_id, src_node_id=m.src_node_id,
                        dst_node_id=m.dst_node_id, reply_to_message_id=m.reply_to_message_id,
                        group_id=m.group_id, created_at=m.created_at, ttl=m.ttl, message_type=m.message_type,
                        src_task_id=m.src_task_id, dst_task_id=m.dst_task_id)
    return Message(content=msg.content, metadata=metadata)
