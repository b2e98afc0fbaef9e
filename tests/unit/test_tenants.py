"""Tenants and classes (deepinfer_router/fairness/tenants.py): --api-key NAME:KEY,
plain keys, X-Priority only downwards, bounded metric labels."""

from __future__ import annotations

import pytest

from deepinfer_router.errors import RouterError
from deepinfer_router.fairness.tenants import (
    TenantKey,
    header_tenant,
    lower_class,
    metric_tenant,
    parse_api_key,
)
from deepinfer_router.proxy.auth import check_api_key
from deepinfer_router.settings import RouterSettings


@pytest.mark.parametrize(("spec", "want"), [
    ("sk-plain", TenantKey("default", "sk-plain")),
    ("team-a:sk-1", TenantKey("team-a", "sk-1")),
    ("team.b_2:sk:with:colons", TenantKey("team.b_2", "sk:with:colons")),
])
def test_keys_name_their_tenant(spec, want):
    assert parse_api_key(spec) == want


@pytest.mark.parametrize("spec", ["", "bad name:SECRET", ":SECRET", "t:",
                                  "x" * 65 + ":SECRET", "SECRET-PART:x:y!"])
def test_bad_key_specs_are_refused_without_repeating_the_key(spec):
    if spec == "SECRET-PART:x:y!":  # a valid name after all: a key with ':' given by name
        assert parse_api_key(spec) == TenantKey("SECRET-PART", "x:y!")
        return
    with pytest.raises(ValueError) as info:
        parse_api_key(spec)
    assert "SECRET" not in str(info.value)


def test_settings_refuse_a_bad_spec_and_keep_the_tenants():
    with pytest.raises(ValueError):
        RouterSettings(api_key=["bad name:secret"])
    keys = RouterSettings(api_key=["a:k1", "k2"]).tenant_keys()
    assert keys == [TenantKey("a", "k1"), TenantKey("default", "k2")]


def test_the_key_used_names_the_tenant():
    keys = [TenantKey("a", "k1"), TenantKey("b", "k2"), TenantKey("default", "k3")]
    assert check_api_key(keys, "Bearer k2") == "b"
    assert check_api_key(keys, "bearer k3") == "default"
    assert check_api_key([], "") == "default"
    for bad in ("Bearer k", "Bearer k1x", "k1", ""):
        with pytest.raises(RouterError):
            check_api_key(keys, bad)


def test_x_priority_lowers_the_class_never_raises_it():
    assert lower_class("standard", None) == "standard"
    assert lower_class("standard", "batch") == "batch"
    assert lower_class("standard", " Batch ") == "batch"
    assert lower_class("standard", "interactive") == "standard"
    assert lower_class("batch", "interactive") == "batch"
    assert lower_class("interactive", "standard") == "standard"
    assert lower_class("standard", "urgent") == "standard"  # unknown: ignored


def test_header_tenants_and_metric_labels_stay_bounded():
    assert header_tenant("team-a") == "team-a"
    assert header_tenant("not a name!") == "default"
    assert header_tenant(None) == "default"
    assert metric_tenant("team-a", {"team-a"}) == "team-a"
    assert metric_tenant("default", set()) == "default"
    assert metric_tenant("anyone", {"team-a"}) == "other"


def test_whitespace_keys_duplicates_and_the_reserved_name_are_refused():
    for spec in ("team: ", "   ", "other:k1"):
        with pytest.raises(ValueError):
            parse_api_key(spec)
    with pytest.raises(ValueError, match="more than once"):
        RouterSettings(api_key=["a:same-key", "b:same-key"])


def test_the_tenants_table_of_the_toml_file_adds_to_the_flags(tmp_path):
    from deepinfer_router.shared.settings_loader import load_settings
    config = tmp_path / "router.toml"
    config.write_text('api_key = ["x:kx"]\n'
                      '[tenants.chat]\nkeys = ["sk-chat", "sk:with:colon"]\n'
                      'class = "interactive"\nweight = 2\n'
                      '[tenants.etl]\nkeys = ["sk-etl"]\nclass = "batch"\n'
                      'tokens_per_minute = 1000\n')
    s = load_settings(RouterSettings, {"api_key": ["y:ky"]}, config, "DEEPINFER_")
    table = s.tenant_table()
    assert [(k.tenant, k.key) for k in table.keys] == [
        ("y", "ky"), ("chat", "sk-chat"), ("chat", "sk:with:colon"), ("etl", "sk-etl")]
    assert table.klass("chat") == "interactive" and table.klass("etl") == "batch"
    assert table.klass("y") == table.klass("unknown") == "standard"
    assert table.weights() == {"chat": 2.0}
    assert table.limits()["etl"].tokens_per_minute == 1000 and "chat" not in table.limits()
    assert table.names == {"y", "chat", "etl"}


@pytest.mark.parametrize("tenants", [
    {"bad name": {}},
    {"other": {}},
    {"a": {"class": "urgent"}},
    {"a": {"keys": [""]}},
    {"a": {"keys": ["k"]}, "b": {"keys": ["k"]}},
    {"a": {"weight": 0}},
    {"a": {"max_concurrency": 0}},
    {"a": {"rpm": 5}},  # a misspelt budget is an error, not no budget
])
def test_bad_tenant_tables_are_refused(tenants):
    with pytest.raises(ValueError):
        RouterSettings(tenants=tenants)


def test_classes_are_configurable_and_x_priority_follows_them():
    s = RouterSettings(priority_classes=["gold", "silver"], default_class="gold",
                       tenants={"a": {"class": "silver"}})
    table = s.tenant_table()
    assert table.klass("a") == "silver" and table.klass("b") == "gold"
    assert lower_class("gold", "Silver", table.classes) == "silver"
    assert lower_class("silver", "gold", table.classes) == "silver"
    with pytest.raises(ValueError):
        RouterSettings(default_class="standard", priority_classes=["gold"])
    with pytest.raises(ValueError):
        RouterSettings(priority_classes=["gold", "gold"])


def test_the_tenants_table_from_the_environment_as_json(monkeypatch):
    from deepinfer_router.shared.settings_loader import load_settings
    monkeypatch.setenv("DEEPINFER_TENANTS",
                       '{"etl": {"keys": ["sk-etl"], "class": "batch", "weight": 0.5}}')
    table = load_settings(RouterSettings, {}, None, "DEEPINFER_").tenant_table()
    assert table.klass("etl") == "batch" and table.weights() == {"etl": 0.5}
