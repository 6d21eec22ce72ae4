"""What the rehearsal relies on in Flower's Simulation Engine (flwr[simulation] 1.42), pinned so
that a Flower upgrade that changes it fails here, loudly, before an operator's rehearsal does."""

from __future__ import annotations

import inspect

import ray  # noqa: F401  (the test extra brings it: a missing Ray is a failure, not a skip)


def test_run_simulation_takes_what_the_rehearsal_passes():
    from flwr.simulation import run_simulation

    params = inspect.signature(run_simulation).parameters
    assert {"server_app", "client_app", "num_supernodes", "backend_config"} <= set(params)


def test_a_virtual_node_config_holds_its_partition_id():
    from flwr.common.constant import PARTITION_ID_KEY
    from flwr.server.superlink.fleet.vce import vce_api

    assert PARTITION_ID_KEY == "partition-id"  # what client/rehearsal.py reads
    assert "PARTITION_ID_KEY" in inspect.getsource(vce_api._register_node_info_stores)


def test_the_ray_backend_reads_resources_and_init_args():
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    source = inspect.getsource(RayBackend)
    assert '"client_resources"' in source and '"init_args"' in source  # rehearse.backend_config
    assert "ray.init(" in source  # init_args (address, log_to_driver) go there


def test_the_simulation_server_context_is_fresh_and_its_run_config_writable():
    from flwr.simulation import run_simulation as module_run

    source = inspect.getsource(inspect.getmodule(module_run))
    assert "run_config=UserConfig()" in source  # rehearse._server_app sets project-dir in it
