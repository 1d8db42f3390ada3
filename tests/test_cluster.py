"""A real Ray cluster on loopback: a head and two worker nodes, tasks placed on runners there."""

from __future__ import annotations

import os

import pytest
from conftest import gfootball_available
from test_training import make_config

from marl_shared.training.config import ConfigError
from marl_shared.training.run import Trainer, resolve_tasks

GRF = "grf/academy_3_vs_1_with_keeper"


@pytest.fixture
def loopback_cluster():
    """Head (no rollout resource) + two worker nodes offering one 'rollout' slot each."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keeps every node on 127.0.0.1
    import ray
    from ray.cluster_utils import Cluster

    was_running = ray.is_initialized()
    ray.shutdown()  # the session's embedded Ray; restarted below for the tests after this one
    common = {"node_ip_address": "127.0.0.1", "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, **common})
    workers = [cluster.add_node(num_cpus=1, resources={"rollout": 1}, **common) for _ in range(2)]
    cluster.wait_for_nodes()
    try:
        yield cluster, workers
    finally:
        ray.shutdown()
        cluster.shutdown()
        if was_running:
            ray.init(
                num_cpus=2,
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                log_to_driver=False,
                logging_level="ERROR",
            )


def test_task_placement_must_name_existing_env_runners(tmp_path):
    with pytest.raises(ConfigError, match=r"env_runners must list env runner indices between 1"):
        make_config(
            tmp_path,
            "tasks=[smax/3m]",
            "cluster.num_env_runners=1",
            "++task.per_task={smax/3m:{env_runners:[2]}}",
        )


# About 70 s on a loaded 2-core machine: two Ray nodes start and one runner compiles SMAX.
@pytest.mark.skipif(not gfootball_available(), reason="football engine not built")
def test_runners_on_worker_nodes_sample_placed_tasks_and_survive_a_node_leaving(
    loopback_cluster, tmp_path
):
    cluster, workers = loopback_cluster
    worker_ids = {node.node_id for node in workers}
    config = make_config(
        tmp_path,
        f"tasks=[smax/3m,{GRF}]",
        "cluster=address",
        f"cluster.address={cluster.address}",
        "cluster.num_env_runners=2",
        "cluster.num_cpus_per_env_runner=0.5",
        "++cluster.custom_resources_per_env_runner={rollout:1}",
        "cluster.health_probe_timeout_s=2",
        "cluster.restart_delay_s=0.2",
        f"++task.per_task={{smax/3m:{{env_runners:[1]}},{GRF}:{{env_runners:[2]}}}}",
        "train.eval_interval=0",
    )
    (tmp_path / "run").mkdir()
    trainer = Trainer(config, resolve_tasks(config), tmp_path / "run")
    try:
        trainer.build()
        import ray

        assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
        first = trainer.step()
        placed = {w["index"]: w for w in trainer.algo.last_report["workers"]}

        # The node that hosts the football runner leaves the cluster mid-run.
        gone = next(node for node in workers if node.node_id == placed[2]["node_id"])
        cluster.remove_node(gone, allow_graceful=False)
        after = [trainer.step() for _ in range(2)]
        later_workers = trainer.algo.last_report["workers"]
    finally:
        trainer.stop()

    # Each runner sampled only its task, on its own worker node, never on the head.
    assert placed[1]["tasks"] == ["smax/3m"] and placed[2]["tasks"] == [GRF]
    assert {placed[1]["node_id"], placed[2]["node_id"]} == worker_ids
    assert first["tasks"]["smax/3m"]["env_steps"] == 32 and first["tasks"][GRF]["env_steps"] == 8

    # Training went on: football fell back to the driver, SMAX stayed on the surviving node.
    assert after[0]["faults"]["env_runners_lost"] == 1
    assert all(record["faults"]["local_fallback"] == 1 for record in after)
    assert after[-1]["tasks"]["smax/3m"]["env_steps"] == 96
    assert after[-1]["tasks"][GRF]["env_steps"] == 24
    by_index = {w["index"]: w for w in later_workers}
    assert by_index[1]["node_id"] == placed[1]["node_id"]
    assert by_index[0]["tasks"] == [GRF]  # index 0: the driver's local env runner
