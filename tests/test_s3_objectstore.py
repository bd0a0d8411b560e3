"""The core's object-store module: the S3 keys, checks and client both the s3 tier
and the remote tier's S3 rendezvous use, without either importing the other."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from pydantic import ValidationError

from kvbm.objectstore import S3Connection, redact_url
from kvbm_tiers_remote.config import RendezvousS3Config
from kvbm_tiers_s3.config import S3TierConfig


def _fresh_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=120)


def test_core_object_store_module_imports_no_boto3() -> None:
    r = _fresh_python("""
        import sys
        import kvbm.objectstore
        loaded = [m for m in ("boto3", "botocore") if m in sys.modules]
        assert not loaded, loaded
        """)
    assert r.returncode == 0, r.stderr


def test_remote_tier_config_and_rendezvous_import_no_s3_tier() -> None:
    r = _fresh_python("""
        import sys
        import kvbm_tiers_remote.config, kvbm_tiers_remote.rendezvous
        loaded = [m for m in sys.modules if m.startswith("kvbm_tiers_s3")]
        assert not loaded, loaded
        """)
    assert r.returncode == 0, r.stderr


def test_s3_tier_config_keeps_its_yaml_keys() -> None:
    tier_keys = {"type", "name", "capacity", "num_blocks", "policy", "policy_options",
                 "admission", "admission_options"}
    s3_keys = {
        "bucket", "prefix", "endpoint_url", "region", "addressing_style", "profile",
        "aws_access_key_id", "aws_secret_access_key", "aws_session_token", "max_concurrency",
        "connect_timeout_s", "read_timeout_s", "read_deadline_s", "request_deadline_s", "retries",
        "backoff_base_s", "backoff_max_s", "breaker_failures", "breaker_cooldown_s",
        "breaker_max_cooldown_s", "conditional_put", "pack_blocks", "pack_pointers",
        "delete_on_evict", "exist_cache_size", "negative_ttl_s", "create_bucket",
        "zero_copy_reads",
    }
    assert set(S3TierConfig.model_fields) - tier_keys == s3_keys
    assert issubclass(S3TierConfig, S3Connection)
    cfg = S3TierConfig.model_validate({"type": "s3", "bucket": "kv-cache", "prefix": "/prod/"})
    assert (cfg.prefix, cfg.connect_timeout_s, cfg.read_timeout_s) == ("prod", 2.0, 10.0)


def test_both_configs_check_object_store_keys_the_same_way() -> None:
    for model in (S3TierConfig, RendezvousS3Config):
        extra = {"type": "s3"} if model is S3TierConfig else {}
        with pytest.raises(ValidationError, match="3-63 characters"):
            model.model_validate({**extra, "bucket": "Not_A_Bucket"})
        with pytest.raises(ValidationError, match="KVBM_TEST_OBJSTORE_UNSET is not set"):
            model.model_validate({**extra, "bucket": "kv-cache",
                                  "aws_secret_access_key": "${KVBM_TEST_OBJSTORE_UNSET}"})
        with pytest.raises(ValidationError) as e:
            model.model_validate({**extra, "bucket": "kv-cache",
                                  "endpoint_url": "http://user:pa55word@127.0.0.1:9"})
        assert "credentials in the URL" in str(e.value) and "pa55word" not in str(e.value)


def test_connection_secrets_never_appear_in_repr_or_dump() -> None:
    c = S3Connection(bucket="kv-cache", aws_access_key_id="AKIAOBJSTORE",
                     aws_secret_access_key="s3cret-objstore", aws_session_token="t0ken-objstore")
    text = repr(c) + str(c.model_dump())
    for secret in ("AKIAOBJSTORE", "s3cret-objstore", "t0ken-objstore"):
        assert secret not in text
    assert redact_url("http://u:pw@127.0.0.1:9000/x") == "http://***@127.0.0.1:9000/x"
