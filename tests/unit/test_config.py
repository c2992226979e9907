import pytest

from nexus_extproc.config import ConfigError, load_config, parse_config
from tests.conftest import BACKENDS


def test_bad_key_is_named(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("backends: {}\nbudget: {monthly_limit_usd: -5}\n")
    with pytest.raises(ConfigError) as e:
        load_config(f, environ={})
    msg = str(e.value)
    assert "budget.monthly_limit_usd" in msg and "backends" in msg


def test_unknown_key_rejected():
    with pytest.raises(ConfigError, match=r"budget\.monthly_limt_usd"):
        parse_config({"backends": BACKENDS, "budget": {"monthly_limit_usd": 1, "monthly_limt_usd": 2}}, environ={})


def test_equivalent_must_be_local_backend():
    with pytest.raises(ConfigError, match="not local"):
        parse_config({"backends": BACKENDS, "equivalents": {"gpt-4o": "openai/gpt-4o-mini"}}, environ={})


def test_env_overrides_nested_keys():
    cfg = parse_config({"backends": BACKENDS, "budget": {"monthly_limit_usd": 100}},
                       environ={"NEXUS_BUDGET__MONTHLY_LIMIT_USD": "42.5", "NEXUS_STORE__KIND": "redis",
                                "NEXUS_UNRELATED": "x"})
    assert str(cfg.budget.monthly_limit_usd) == "42.5" and cfg.store.kind == "redis"


def test_invalid_yaml_is_clear_error(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("budget: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f, environ={})


def test_defaults():
    cfg = parse_config({"backends": BACKENDS}, environ={})
    assert cfg.budget is None and cfg.store.kind == "sqlite" and cfg.store_failure == "closed"
    assert cfg.unpriced_model_action == "charge_fallback"
