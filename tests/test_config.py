"""Configuration: typed, validated, and errors that name the key."""

import pytest

from rag4dmc.pipeline.config import ConfigError, JobConfig, KBConfig, RetrievalConfig, load_yaml


def test_unknown_keys_and_bad_values_name_the_key(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("retrieval:\n  alpah: 0.3\n  top_k: 0\n")
    with pytest.raises(ConfigError) as err:
        load_yaml(path, JobConfig)
    assert "retrieval.alpah" in str(err.value) and "retrieval.top_k" in str(err.value)


def test_results_cannot_exceed_stage_one_candidates():
    with pytest.raises(ValueError, match="n_results"):
        RetrievalConfig(top_k=3, n_results=5)


def test_yaml_round_trip_and_hash_ignores_resources(tmp_path):
    path = tmp_path / "kb.yaml"
    path.write_text("filter:\n  tau_cent: 0.6\nindex:\n  kind: ivf\n")
    cfg = load_yaml(path, KBConfig)
    assert cfg.filter.tau_cent == 0.6 and cfg.index.kind == "ivf"
    a = JobConfig()
    b = JobConfig.model_validate({"resources": {"embed": {"num_cpus": 0.25}}})
    c = JobConfig.model_validate({"retrieval": {"alpha": 0.9}})
    assert a.config_hash() == b.config_hash() != c.config_hash()
