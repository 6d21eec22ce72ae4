"""ClientApp: replies at once with a "B" array as large as a LoRA Commons update payload (no training)."""

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    b = msg.content["arrays"]["B"].numpy()
    update = b + np.float32(1e-3)  # stands in for local training: same shape, new values
    content = RecordDict(
        {
            "arrays": ArrayRecord({"B": Array(update)}),
            "metrics": MetricRecord({"num-examples": 64}),
        }
    )
    return Message(content, reply_to=msg)
