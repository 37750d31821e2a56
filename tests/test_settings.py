"""Settings from the environment: identity, quotas, webhooks; a bad value is one clear error."""

from __future__ import annotations

import pytest

from alexnet_dist.errors import ConfigError
from alexnet_dist.settings import load_settings, parse_quotas


def test_identity_quotas_and_webhooks_come_from_the_environment() -> None:
    s = load_settings(
        {
            "ALEXNET_DIST_USER": "ana",
            "ALEXNET_DIST_TEAM": "vision",
            "ALEXNET_DIST_QUOTAS": "vision=gpus:8,workers:4; nlp=gpus:4",
            "ALEXNET_DIST_USAGE_HALF_LIFE_H": "2",
            "ALEXNET_DIST_WEBHOOKS": "http://a/hook, http://b/hook",
            "ALEXNET_DIST_WEBHOOK_SLACK": "1",
        }
    )
    assert (s.user, s.team) == ("ana", "vision")
    assert s.quotas == {"vision": {"gpus": 8.0, "workers": 4.0}, "nlp": {"gpus": 4.0}}
    assert s.usage_half_life_s == 7200.0
    assert s.webhooks == ("http://a/hook", "http://b/hook") and s.webhook_slack
    assert load_settings({}).user  # the login name when not set


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("vision=tpus:8", "use workers:N, cpus:N or gpus:N"),
        ("vision=gpus:many", "'many' is not a number"),
        ("=gpus:1", "write team=gpus:8,workers:4"),
    ],
)
def test_a_bad_quota_is_one_line_naming_it(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_quotas(text)
    with pytest.raises(ConfigError, match="ALEXNET_DIST_QUOTAS"):
        load_settings({"ALEXNET_DIST_QUOTAS": text})
