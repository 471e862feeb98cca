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


def _option(sub: str, flag: str):
    from rag4dmc.pipeline.cli import parser

    subparsers = next(a for a in parser()._actions if a.dest == "command").choices
    return next(a for a in subparsers[sub]._actions if flag in a.option_strings)


def test_every_flag_is_described_by_its_config_field_so_help_and_choices_cannot_drift():
    from typing import Literal, get_args, get_origin

    from rag4dmc.pipeline import cli
    from rag4dmc.pipeline.config import EvalConfig, ServeConfig

    tables = {"complete": (JobConfig, [cli.JOB_FLAGS, cli.OUTPUT_FLAGS, cli.COLUMN_FLAGS, cli.STORAGE_FLAGS]),
              "build": (KBConfig, [cli.KB_FLAGS]),
              "evaluate": (EvalConfig, [cli.EVAL_FLAGS, cli.EVAL_JOB_FLAGS, cli.LABEL_FLAGS]),
              "serve": (ServeConfig, [cli.SERVE_FLAGS])}
    for sub, (model, groups) in tables.items():
        for table in groups:
            for flag, key in table.items():
                field = cli.field_of(model, key)
                assert field.description, f"{key} has no description: {flag}'s help would be empty"
                if sub == "build":
                    continue  # `kb build` is a sub-command of `kb`
                option = _option(sub, flag)
                assert field.description.replace("%", "%%") in option.help and f"[{key}]" in option.help
                if get_origin(field.annotation) is dict:
                    continue  # NAME=V1,V2,... (--sweep): the names are checked by the config
                literal = next((a for a in (field.annotation, *get_args(field.annotation)) if get_origin(a) is Literal),
                               None)
                if literal is not None:
                    assert option.choices == list(get_args(literal)), flag


def test_flags_accept_every_value_the_config_accepts():
    from rag4dmc.pipeline.cli import EVAL_FLAGS, JOB_FLAGS, build_config, parser
    from rag4dmc.pipeline.config import EvalConfig

    args = parser().parse_args(["complete", "--data", "d", "--kb", "k", "--out", "o", "--retrieval-mode", "cross"])
    assert build_config(args, JobConfig, [JOB_FLAGS]).retrieval.mode == "cross"  # the mode the old help left out
    args = parser().parse_args(["evaluate", "--data", "d", "--external", "e", "--out", "o",
                                "--variants", "rag4dmc", "rag4dmc_default", "--missing-rate", "0.3", "0.7"])
    cfg = build_config(args, EvalConfig, [EVAL_FLAGS])
    assert cfg.evaluation.variants == ["rag4dmc", "rag4dmc_default"] and cfg.evaluation.missing_rates == [0.3, 0.7]
    with pytest.raises(SystemExit):  # a value outside the field's Literal is refused by the parser, naming the choices
        parser().parse_args(["complete", "--data", "d", "--kb", "k", "--out", "o", "--retrieval-mode", "nearest"])
