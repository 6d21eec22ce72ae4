"""ServerApp: Flower's own FedAvg strategy loop, timed per round.

The global arrays are "A" (frozen, as in LoRA Commons' ffa mode) and "B"; clients send
back B only and FedAvg averages it, so each direction carries the bytes of a LoRA
Commons round. The strategy and its `start()` loop are stock Flower; the subclass only
records the time each round starts and keeps A in the global arrays.
"""

import json
import time

import numpy as np
from flwr.app import Array, ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


class TimedFedAvg(FedAvg):
    def __init__(self, frozen_a: Array, **kwargs) -> None:  # noqa: ANN003
        super().__init__(**kwargs)
        self.frozen_a = frozen_a
        self.round_starts: dict[int, float] = {}

    def configure_train(self, server_round, arrays, config, grid):  # noqa: ANN001, ANN201
        self.round_starts[server_round] = time.time()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):  # noqa: ANN001, ANN201
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:
            arrays = ArrayRecord({"A": self.frozen_a, "B": arrays["B"]})
        return arrays, metrics


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    a = Array(np.zeros(int(rc["a-floats"]), dtype=np.float32))
    b = Array(np.zeros(int(rc["b-floats"]), dtype=np.float32))
    strategy = TimedFedAvg(
        a, fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=2, min_available_nodes=2
    )
    started = time.time()
    strategy.start(grid=grid, initial_arrays=ArrayRecord({"A": a, "B": b}), num_rounds=int(rc["num-rounds"]))
    finished = time.time()
    report = {
        "started": started,
        "finished": finished,
        "round_starts": {str(k): v for k, v in sorted(strategy.round_starts.items())},
    }
    with open(str(rc["out-file"]), "w") as fh:
        json.dump(report, fh)
