"""Merging methods on small tensors with hand-computed results, and a merge of real backbones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from marl_shared.merging import average, dare, task_arithmetic, task_vector, ties_merge, trim_top_k


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_task_vector_is_finetuned_minus_base():
    tau = task_vector({"w": t(1.0, 2.0)}, {"w": t(1.5, 1.0)})
    assert torch.equal(tau["w"], t(0.5, -1.0))


def test_task_arithmetic_adds_scaled_sum_and_negation_subtracts():
    base = {"w": t(1.0, 2.0)}
    taus = [{"w": t(0.5, -1.0)}, {"w": t(1.0, 1.0)}]
    # 1 + 0.5 * (0.5 + 1.0) = 1.75 ; 2 + 0.5 * (-1 + 1) = 2.0
    assert torch.allclose(task_arithmetic(base, taus, scaling=0.5)["w"], t(1.75, 2.0))
    # Negating the second task: 1 + (0.5 - 1.0) = 0.5 ; 2 + (-1 - 1) = 0.0
    merged = task_arithmetic(base, taus, scaling=1.0, coefficients=[1.0, -1.0])
    assert torch.allclose(merged["w"], t(0.5, 0.0))


def test_average_is_elementwise_mean_of_models():
    merged = average([{"w": t(1.0, 3.0)}, {"w": t(3.0, 5.0)}, {"w": t(2.0, 1.0)}])
    assert torch.allclose(merged["w"], t(2.0, 3.0))


def test_trim_keeps_largest_magnitudes_over_the_whole_vector_or_per_tensor():
    vector = {"a": t(0.1, -0.5, 0.3, -0.05), "b": t(0.4, 0.0, -0.2, 0.6)}
    # 25% of 8 entries = 2 kept over the whole vector: 0.6 and -0.5.
    trimmed = trim_top_k(vector, 0.25)
    assert torch.equal(trimmed["a"], t(0.0, -0.5, 0.0, 0.0))
    assert torch.equal(trimmed["b"], t(0.0, 0.0, 0.0, 0.6))
    # 50% of each tensor = 2 per tensor.
    per = trim_top_k(vector, 0.5, per_tensor=True)
    assert torch.equal(per["a"], t(0.0, -0.5, 0.3, 0.0))
    assert torch.equal(per["b"], t(0.4, 0.0, 0.0, 0.6))


TAUS = [
    {"w": t(0.5, -0.2, 0.3, 0.0)},
    {"w": t(0.3, 0.4, -0.6, 0.1)},
    {"w": t(-0.1, 0.15, -0.05, 0.2)},
]


def test_ties_without_trim_elects_sign_by_mass_and_averages_agreeing_entries():
    base = {"w": t(1.0, 1.0, 1.0, 1.0)}
    # Sums 0.7, 0.35, -0.35, 0.3 -> signs +, +, -, +.
    # Agreeing means: (0.5+0.3)/2, (0.4+0.15)/2, (-0.6-0.05)/2, (0.1+0.2)/2 (the 0.0 does not vote).
    merged = ties_merge(base, TAUS, density=1.0, scaling=1.0)
    assert torch.allclose(merged["w"], t(1.4, 1.275, 0.675, 1.15))


def test_ties_trims_then_elects_then_takes_disjoint_mean():
    base = {"w": t(1.0, 1.0, 1.0, 1.0)}
    # Trim to 2 of 4: [0.5,0,0.3,0], [0,0.4,-0.6,0], [0,0.15,0,0.2].
    # Sums 0.5, 0.55, -0.3, 0.2 -> +, +, -, +; disjoint means 0.5, 0.275, -0.6, 0.2.
    merged = ties_merge(base, TAUS, density=0.5, scaling=0.5)
    assert torch.allclose(merged["w"], t(1.25, 1.1375, 0.7, 1.1))


def test_ties_entry_where_signs_cancel_gets_zero_update():
    base = {"w": t(0.0)}
    merged = ties_merge(base, [{"w": t(0.3)}, {"w": t(-0.3)}], density=1.0)
    assert torch.equal(merged["w"], t(0.0))


def test_dare_drops_and_rescales_with_a_fixed_seed():
    # torch.rand with seed 0 draws 0.9701, 0.7078, 0.4594, 0.9207: with p = 0.75 entries
    # 0 and 3 survive (draw >= p) and are multiplied by 1 / (1 - 0.75) = 4.
    out = dare({"w": t(2.0, 4.0, 6.0, 8.0)}, 0.75, torch.Generator().manual_seed(0))
    assert torch.equal(out["w"], t(8.0, 0.0, 0.0, 32.0))


def test_dare_keeps_the_expected_fraction_and_the_sum_on_average():
    vector = {"w": torch.ones(20_000, dtype=torch.float64)}
    out = dare(vector, 0.9, torch.Generator().manual_seed(3))["w"]
    kept = (out != 0).double().mean().item()
    assert 0.09 < kept < 0.11
    assert torch.allclose(out[out != 0], torch.full_like(out[out != 0], 10.0))
    assert abs(out.sum().item() - 20_000) < 0.06 * 20_000


def test_dare_then_task_arithmetic_composes():
    base = {"w": t(1.0, 1.0, 1.0, 1.0)}
    tau = dare({"w": t(2.0, 4.0, 6.0, 8.0)}, 0.75, torch.Generator().manual_seed(0))
    merged = task_arithmetic(base, [tau], scaling=0.25)
    assert torch.allclose(merged["w"], t(3.0, 1.0, 1.0, 9.0))


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="shape"):
        task_arithmetic({"w": t(1.0, 2.0)}, [{"w": t(1.0)}])


# ----------------------------------------------------------------------------- real backbones


@pytest.mark.slow
def test_merge_of_two_real_finetuned_backbones_is_evaluated_on_both_tasks(ray_local, tmp_path):
    """Base on two SMAX maps, one fine-tune per map, TIES merge evaluated on both."""
    from hydra import compose, initialize_config_dir
    from test_training import make_config

    from marl_shared.cli import CONF_DIR
    from marl_shared.merging.command import Source, run_merge
    from marl_shared.training import checkpoint as ckpt
    from marl_shared.training.run import Trainer, resolve_tasks

    config = make_config(tmp_path, "tasks=[smax/3m,smax/2s3z]")
    specs = resolve_tasks(config)
    trainer = Trainer(config, specs, tmp_path / "base")
    try:
        trainer.build()
        (tmp_path / "base").mkdir()
        trainer.write_config()
        trainer.step()
        base = trainer.save_checkpoint()
        initial = trainer.algo.learner_group.get_state(components="learner")
        finetuned = []
        for task in ("smax/3m", "smax/2s3z"):
            trainer.algo.learner_group.set_state(initial)
            trainer.algo.set_active_tasks([task])
            before = dict(trainer.env_steps)
            trainer.step()
            trainer.step()
            assert trainer.env_steps[task] > before[task]
            assert sum(trainer.env_steps.values()) - sum(before.values()) == (
                trainer.env_steps[task] - before[task]
            )  # only the active task was sampled
            trainer.run_dir = tmp_path / f"ft_{task.split('/')[1]}"
            finetuned.append(trainer.save_checkpoint())
            trainer.env_steps = before
    finally:
        trainer.stop()

    a, b = Source(str(finetuned[0])), Source(str(finetuned[1]))
    base_source = Source(str(base))
    key = "backbone.layers.0.weight"
    assert not np.array_equal(a.modules["shared_backbone"][key], b.modules["shared_backbone"][key])

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            config_name="merge",
            overrides=[
                f"base={base}",
                f"models=[{finetuned[0]},{finetuned[1]}]",
                "method=ties",
                "ties.density=0.5",
                "scaling=[0.5,1.0]",
                "eval.episodes=2",
                "eval.validation_episodes=1",
            ],
        )
    out = tmp_path / "merged"
    out.mkdir()
    result = run_merge(cfg, out)

    assert result["tasks"] == ["smax/3m", "smax/2s3z"]
    assert [row["scaling"] for row in result["sweep"]] == [0.5, 1.0]
    assert len(result["rows"]) == 4  # merged, two individual models, the base
    for report in result["rows"].values():
        assert set(report) == {"smax/3m", "smax/2s3z"}
        assert all(0.0 <= v["rate"] <= 1.0 and np.isfinite(v["return"]) for v in report.values())
    merged = ckpt.load_module_state(ckpt.resolve_checkpoint(out))
    # The merged backbone equals TIES on the sources' task vectors, recomputed here.
    vectors = [
        task_vector(
            {k: torch.from_numpy(v) for k, v in base_source.modules["shared_backbone"].items()},
            {k: torch.from_numpy(v) for k, v in s.modules["shared_backbone"].items()},
        )
        for s in (a, b)
    ]
    expected = ties_merge(
        {k: torch.from_numpy(v) for k, v in base_source.modules["shared_backbone"].items()},
        vectors,
        density=0.5,
        scaling=result["scaling"],
    )
    for name, value in expected.items():
        assert np.allclose(merged["shared_backbone"][name], value.numpy(), atol=1e-6)
    # Each task keeps the task module of the model fine-tuned on it.
    assert np.array_equal(
        merged["smax__3m"]["critic.net.0.0.weight"], a.modules["smax__3m"]["critic.net.0.0.weight"]
    )
    assert np.array_equal(
        merged["smax__2s3z"]["critic.net.0.0.weight"],
        b.modules["smax__2s3z"]["critic.net.0.0.weight"],
    )
    assert (out / "merge.md").read_text().count("|") > 10


def test_a_model_is_scored_only_on_tasks_it_or_the_base_has_modules_for():
    """Held-out tasks fine-tuned apart: model A never saw B's task, nor did the base."""
    from marl_shared.merging.command import Source, individual_state, merge_table, playable

    def source(modules, owned):
        made = Source.__new__(Source)
        made.modules, made.owned = modules, owned
        return made

    weights = {"w": np.zeros(2, dtype=np.float32)}
    base = source({"shared_backbone": weights, "smax__3m": weights}, [])
    a = source({"shared_backbone": weights, "smax__5m_vs_6m": weights}, ["smax/5m_vs_6m"])
    b = source({"shared_backbone": weights, "smax__10m_vs_11m": weights}, ["smax/10m_vs_11m"])
    tasks = ["smax/5m_vs_6m", "smax/10m_vs_11m", "smax/3m"]
    state = individual_state(a, base, tasks)
    assert set(state) == {"shared_backbone", "smax__5m_vs_6m", "smax__3m"}
    assert playable(state, tasks) == ["smax/5m_vs_6m", "smax/3m"]

    score = {"rate": 0.5, "return": 1.0}
    result = {
        "tasks": tasks[:2],
        "method": "ties",
        "scaling": 1.0,
        "episodes": 4,
        "sweep": [],
        "rows": {
            "merged": {"smax/5m_vs_6m": score, "smax/10m_vs_11m": {"rate": 0.0, "return": 0.0}},
            "model 0: a": {"smax/5m_vs_6m": score},
            "model 1: b": {"smax/10m_vs_11m": score},
        },
    }
    lines = merge_table(result, [a, b]).splitlines()
    assert "| model 0: a | 0.50 (1.00)* | - | 0.500 |" in lines
    assert "| model 1: b | - | 0.50 (1.00)* | 0.500 |" in lines
    assert "| merged | 0.50 (1.00) | 0.00 (0.00) | 0.250 |" in lines
