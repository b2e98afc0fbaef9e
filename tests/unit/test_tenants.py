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
