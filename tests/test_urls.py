"""The URL grammar of LMCACHE_REMOTE_URL: every form, its defaults, clear errors, and no password ever printed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lmcache_connector.urls import RemoteUrl, parse_redis_url, parse_remote_url, redacted_url

SECRET = "s3cr3t-pw"


# ---------------------------------------------------------------- every form, with its defaults


@pytest.mark.parametrize(
    "text,expected",
    [
        ("redis://cache", RemoteUrl("redis", (("cache", 6379),), db=0)),
        ("redis://cache:6380/2", RemoteUrl("redis", (("cache", 6380),), db=2)),
        ("redis://cache/", RemoteUrl("redis", (("cache", 6379),), db=0)),
        ("redis://cache?db=3", RemoteUrl("redis", (("cache", 6379),), db=3)),
        ("redis://10.0.0.7:7000", RemoteUrl("redis", (("10.0.0.7", 7000),), db=0)),
        ("redis://[::1]", RemoteUrl("redis", (("::1", 6379),), db=0)),
        ("redis://[fd00::7]:7000/1", RemoteUrl("redis", (("fd00::7", 7000),), db=1)),
        ("REDIS://cache", RemoteUrl("redis", (("cache", 6379),), db=0)),
        ("rediss://cache.example.com", RemoteUrl("rediss", (("cache.example.com", 6379),), db=0)),
        ("unix:///run/redis/redis.sock", RemoteUrl("unix", db=0, socket_path="/run/redis/redis.sock")),
        ("unix:///run/redis.sock?db=4", RemoteUrl("unix", db=4, socket_path="/run/redis.sock")),
        (
            "redis-sentinel://s1,s2:26380,s3",
            RemoteUrl("redis-sentinel", (("s1", 26379), ("s2", 26380), ("s3", 26379)), db=0, service_name="mymaster"),
        ),
        (
            "redis-sentinel://s1:26379/cache-master?db=1",
            RemoteUrl("redis-sentinel", (("s1", 26379),), db=1, service_name="cache-master"),
        ),
        (
            "redis-cluster://n1:7000,n2:7001,n3",
            RemoteUrl("redis-cluster", (("n1", 7000), ("n2", 7001), ("n3", 6379)), db=0),
        ),
        ("redis-cluster://n1", RemoteUrl("redis-cluster", (("n1", 6379),), db=0)),
        ("s3://kv-cache", RemoteUrl("s3", bucket="kv-cache")),
        ("s3://kv-cache/team-a/llama/", RemoteUrl("s3", bucket="kv-cache", prefix="team-a/llama")),
        ("lm://cache-server:65432", RemoteUrl("lm", (("cache-server", 65432),))),
    ],
)
def test_every_form_parses_with_its_defaults(text, expected):
    assert parse_remote_url(text) == expected


def test_each_form_says_which_client_serves_it_and_whether_the_url_asks_for_tls():
    kinds = {
        text: (parse_remote_url(text).kind, parse_remote_url(text).tls)
        for text in ("redis://h", "rediss://h", "unix:///s.sock", "redis-sentinel://h", "redis-cluster://h")
    }
    assert kinds == {
        "redis://h": ("redis", False),
        "rediss://h": ("redis", True),
        "unix:///s.sock": ("redis", False),
        "redis-sentinel://h": ("redis", False),  # TLS for Sentinel and Cluster is a setting of its own
        "redis-cluster://h": ("redis", False),
    }
    assert parse_remote_url("s3://bucket").kind == "s3" and parse_remote_url("lm://h:1").kind == "lm"


@pytest.mark.parametrize(
    "text,username,password",
    [
        (f"redis://app:{SECRET}@cache:6379/0", "app", SECRET),
        (f"redis://:{SECRET}@cache", None, SECRET),  # the default user
        ("rediss://app:p%40ss%3Aw%2Frd@cache", "app", "p@ss:w/rd"),  # percent-encoded
        ("redis://app:p@ss@cache", "app", "p@ss"),  # the host starts after the last '@'
        (f"unix://app:{SECRET}@/run/redis.sock", "app", SECRET),
        (f"redis-sentinel://app:{SECRET}@s1,s2/mymaster", "app", SECRET),
        (f"redis-cluster://:{SECRET}@n1:7000,n2:7001", None, SECRET),
    ],
)
def test_credentials_are_read_from_every_redis_form(text, username, password):
    url = parse_remote_url(text)
    assert (url.username, url.password) == (username, password)


def test_the_canonical_form_writes_defaults_out_and_parses_back_to_the_same_url():
    for text in (
        "redis://cache",
        "rediss://cache:6380/3",
        "redis://[::1]:7000",
        "unix:///run/redis.sock?db=2",
        "redis-sentinel://s1,s2:26380",
        "redis-cluster://n1:7000,n2",
        "s3://bucket/a/b",
        "lm://h:1",
    ):
        url = parse_remote_url(text)
        assert parse_remote_url(url.redacted()) == url, url.redacted()
    assert str(parse_remote_url("redis-sentinel://s1")) == "redis-sentinel://s1:26379/mymaster"
    assert str(parse_remote_url("redis://cache")) == "redis://cache:6379"


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "text,message",
    [
        ("ftp://cache", "expected one of these schemes: redis://"),
        ("valkey://cache", "write redis://"),  # dropped alias: Valkey speaks the Redis protocol
        ("resp://cache", "write redis://"),
        ("https://s3.example.com/bucket", "AWS_ENDPOINT_URL"),
        ("cache:6379", "expected a URL"),
        ("redis://", "the host is missing"),
        ("redis://:6379", "the host is missing"),
        ("redis://cache:0", "from 1 to 65535"),
        ("redis://cache:65536", "from 1 to 65535"),
        ("redis://cache:port", "from 1 to 65535"),
        ("redis://cache/zero", "database number"),
        ("redis://cache/1?db=2", "given twice"),
        ("redis://cache?timeout=5", "db=N is the only option"),
        ("redis://cache#frag", "fragment"),
        ("redis://a,b", "redis-sentinel://"),
        ("redis://bad host", "not a host name"),
        ("redis://[::1", "in brackets"),
        ("redis://[not-v6]:1", "not an IPv6 address"),
        ("redis://app@cache", "USER:PASSWORD@"),
        ("unix://redis.sock", "absolute"),
        ("unix://", "socket path is missing"),
        ("redis-sentinel://s1/two words", "service name"),
        ("redis-sentinel://s1,,s2", "the host is missing"),
        ("redis-cluster://n1/1", "only database 0"),
        ("redis-cluster://n1?db=1", "only database 0"),
        ("s3://", "bucket is missing"),
        ("s3://Not_A_Bucket", "not an S3 bucket name"),
        ("s3://minio:9000/bucket", "AWS_ENDPOINT_URL"),
        ("s3://key:secret@bucket", "AWS environment"),
        ("s3://bucket?region=x", "takes no options"),
        ("lm://cache", "port of cache is required"),
        ("lm://cache:1/x", "nothing may follow the port"),
        ("lm://u:p@cache:1", "no authentication"),
    ],
)
def test_malformed_urls_say_what_is_wrong(text, message):
    with pytest.raises(ValueError) as err:
        parse_remote_url(text)
    assert message in str(err.value)


def test_an_unknown_scheme_lists_every_accepted_form():
    with pytest.raises(ValueError) as err:
        parse_remote_url("memcached://cache:11211")
    for form in ("redis://", "rediss://", "unix://", "redis-sentinel://", "redis-cluster://", "s3://", "lm://"):
        assert form in str(err.value)


def test_lookup_addresses_are_the_redis_forms_or_plain_host_port():
    assert parse_redis_url("registry:6380") == parse_remote_url("redis://registry:6380")
    assert parse_redis_url("registry") == parse_remote_url("redis://registry")
    for text in ("rediss://r", "unix:///r.sock", "redis-sentinel://s1", "redis-cluster://n1"):
        assert parse_redis_url(text) == parse_remote_url(text)
    for text in ("s3://bucket", "lm://h:1", "http://h:1"):
        with pytest.raises(ValueError, match="expected a Redis address: HOST:PORT, redis://"):
            parse_redis_url(text)


# ---------------------------------------------------------------- the password is never shown


def test_repr_and_str_hide_the_password():
    url = parse_remote_url(f"redis://app:{SECRET}@cache:6379/1")
    assert SECRET not in repr(url) and SECRET not in str(url) and SECRET not in f"{url}"
    assert str(url) == "redis://app:***@cache:6379/1"
    assert "password='***'" in repr(url) and "username='app'" in repr(url)
    assert url.password == SECRET  # the client still gets it
    assert str(parse_remote_url(f"redis-sentinel://:{SECRET}@s1")) == "redis-sentinel://:***@s1:26379/mymaster"


@pytest.mark.parametrize(
    "text,shown",
    [
        (f"redis://app:{SECRET}@cache:6379", "redis://app:***@cache:6379"),
        (f"redis://:{SECRET}@cache", "redis://:***@cache"),
        (f"unix://app:{SECRET}@/run/redis.sock", "unix://app:***@/run/redis.sock"),
        (f"redis-cluster://app:{SECRET}@n1,n2", "redis-cluster://app:***@n1,n2"),
        # malformed, as they appear in error messages: still nothing of the password
        (f"redis://app:{SECRET}@cache:99999", "redis://app:***@cache:99999"),
        (f"redis://app:pa/{SECRET}@cache", "redis://app:***@cache"),
        (f"redis://{SECRET}@cache", "redis://***@cache"),
        (f"app:{SECRET}@registry:6379", "app:***@registry:6379"),
        # nothing secret: unchanged
        ("redis://cache:6379/0", "redis://cache:6379/0"),
        ("s3://bucket/users@example/", "s3://bucket/users@example/"),
        ("10.0.0.5:8200", "10.0.0.5:8200"),
    ],
)
def test_redacted_url_hides_any_password_and_keeps_everything_else(text, shown):
    assert redacted_url(text) == shown


@pytest.mark.parametrize(
    "text",
    [
        f"redis://app:{SECRET}@cache:99999",
        f"redis://app:{SECRET}@a,b",
        f"redis://app:{SECRET}@cache/x",
        f"redis://app:{SECRET}@bad host",
        f"redis://app:pa/{SECRET}@cache",
        f"redis://app:pa?{SECRET}@cache",
        f"redis://app:pa#{SECRET}@cache",
        f"lm://app:{SECRET}@h:1",
        f"s3://app:{SECRET}@bucket",
        f"redis-cluster://app:{SECRET}@n1/3",
    ],
)
def test_error_messages_never_quote_the_password(text):
    with pytest.raises(ValueError) as err:
        parse_remote_url(text)
    assert SECRET not in str(err.value)
    assert SECRET not in redacted_url(text)  # and the value as the configuration error quotes it


def test_the_module_needs_only_the_standard_library():
    code = (
        "import sys, lmcache_connector.urls; "
        "assert not {'torch', 'vllm', 'yaml'} & set(sys.modules), sorted(sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
