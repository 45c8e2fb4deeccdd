"""The ``queue-ratelimit`` command, through Click's runner, against a real Redis server."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from click.testing import CliRunner, Result
from conftest import drop_namespace

from queue_ratelimit import AsyncLimiter, ConfigError, Limiter, __version__
from queue_ratelimit._demo import NAMESPACE as DEMO_NAMESPACE
from queue_ratelimit._limit import Limit
from queue_ratelimit._urls import mask_url
from queue_ratelimit.celery._settings import CelerySettings
from queue_ratelimit.cli import _jobs, format_limit, is_loopback, main, masked

# None removes a variable for the invocation, so only what a test passes is seen.
NO_ENV = {
    "REDIS_URL": None,
    "QUEUE_RATELIMIT_URL": None,
    "QUEUE_RATELIMIT_NAMESPACE": None,
}


@pytest.fixture
def cli(redis_url: str, namespace: str, redis_client: redis.Redis) -> Iterator[CliRunner]:
    """A runner whose environment points the command at the test server and namespace."""
    yield CliRunner(env={**NO_ENV, "REDIS_URL": redis_url, "QUEUE_RATELIMIT_NAMESPACE": namespace})
    drop_namespace(redis_client, namespace)


def ok(runner: CliRunner, *args: str) -> str:
    result = runner.invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def failed(result: Result) -> str:
    """The error text of a run that must fail cleanly: exit 1, one line, no traceback."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, (AssertionError, TypeError, AttributeError))
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: "), result.output
    return lines[0]


def test_version() -> None:
    assert ok(CliRunner(), "--version").strip() == f"queue-ratelimit, version {__version__}"


def test_set_get_list_delete(cli: CliRunner, namespace: str, limiter: Limiter) -> None:
    assert "no limits set" in ok(cli, "limits", "list")
    assert ok(cli, "limits", "set", "global", "1000/s").startswith("global: 1000/s burst 1000")
    ok(cli, "limits", "set", "tenant:*", "50/s", "--burst", "100")
    ok(cli, "limits", "set", "tenant:acme", "6000/m")
    ok(cli, "limits", "set", "tenant:acme:queue:emails", "5/2s", "--shadow")

    # What the command wrote is what the Python API reads.
    assert limiter.get_limit("tenant:*").limit == Limit(50, burst=100)
    assert limiter.get_limit("tenant:acme:queue:emails").shadow

    assert ok(cli, "limits", "get", "tenant:acme").split() == [
        "tenant:acme",
        "6000/m",
        "burst",
        "6000",
        "enforce",
    ]
    listing = ok(cli, "limits", "list")
    assert f"namespace {namespace!r}: config version 4, dry-run off, recording off" in listing
    rows = [line.split() for line in listing.splitlines()]
    assert ["tenant:acme:queue:emails", "5/2s", "2.5", "5", "shadow"] in rows

    ok(cli, "limits", "delete", "tenant:acme")
    assert "tenant:acme " not in ok(cli, "limits", "list")


def test_set_keeps_the_mode_unless_told(cli: CliRunner, limiter: Limiter) -> None:
    ok(cli, "limits", "set", "queue:emails", "5/s", "--shadow")
    assert "(shadow)" in ok(cli, "limits", "set", "queue:emails", "8/s")
    assert limiter.get_limit("queue:emails").shadow
    assert "(enforce)" in ok(cli, "limits", "set", "queue:emails", "8/s", "--enforce")
    assert not limiter.get_limit("queue:emails").shadow


def test_json_output(cli: CliRunner, namespace: str) -> None:
    ok(cli, "limits", "set", "tenant:*", "10/h", "--burst", "3")
    ok(cli, "limits", "exempt", "vip")
    data = json.loads(ok(cli, "limits", "list", "--json"))
    assert data == {
        "namespace": namespace,
        "version": 2,
        "dry_run": False,
        "recording_s": None,
        "limits": {
            "tenant:*": {
                "limit": "10/h",
                "rate": 10.0,
                "per": 3600.0,
                "burst": 3.0,
                "shadow": False,
            }
        },
        "concurrency": {},
        "exempt": {"vip": "tenant"},
        "weights": {},
        "pauses": {},
    }
    one = json.loads(ok(cli, "limits", "get", "tenant:*", "--json"))
    assert (one["scope"], one["burst"]) == ("tenant:*", 3.0)


def test_exempt_modes(cli: CliRunner, limiter: Limiter) -> None:
    assert "exempt from its tenant caps" in ok(cli, "limits", "exempt", "vip")
    assert "exempt from every cap" in ok(cli, "limits", "exempt", "boss", "--mode", "all")
    assert limiter.exemptions() == {"boss": "all", "vip": "tenant"}
    assert "exempt: boss (every cap), vip (its tenant caps)" in ok(cli, "limits", "list")
    assert "no longer exempt" in ok(cli, "limits", "exempt", "vip", "--mode", "none")
    assert "was not exempt" in ok(cli, "limits", "exempt", "vip", "--mode", "none")
    assert limiter.exemptions() == {"boss": "all"}


def test_dry_run_switches_the_namespace(cli: CliRunner, limiter: Limiter) -> None:
    ok(cli, "limits", "set", "global", "1/h")
    assert limiter.acquire("acme").allowed
    assert not limiter.acquire("acme").allowed
    assert "dry-run ON" in ok(cli, "limits", "dry-run", "on")
    assert "dry-run ON" in ok(cli, "limits", "list")
    decision = limiter.acquire("acme")
    assert (decision.allowed, decision.would_deny) == (True, ("global",))
    ok(cli, "limits", "dry-run", "off")
    assert "dry-run off" in ok(cli, "limits", "list")
    assert not limiter.acquire("acme").allowed


def test_audit_shows_the_latest_changes_first(cli: CliRunner) -> None:
    ok(cli, "limits", "set", "global", "100/s")
    ok(cli, "limits", "set", "global", "200/s", "--burst", "50")
    ok(cli, "limits", "delete", "global")
    lines = ok(cli, "limits", "audit", "-n", "2").splitlines()
    assert lines[0].split() == ["time", "(UTC)", "version", "actor", "op", "field", "change"]
    assert len(lines) == 3
    version, actor, *change = lines[1].split()[2:]
    assert (version, change) == ("3", ["del", "global", "200/s", "burst", "50", "->", "-"])
    assert actor.startswith("cli")
    assert "100/s burst 100 -> 200/s burst 50" in lines[2]
    entries = json.loads(ok(cli, "limits", "audit", "-n", "5", "--json"))
    assert [e["version"] for e in entries] == [3, 2, 1]


def test_record_and_preview(cli: CliRunner, limiter: Limiter) -> None:
    limiter.set_limit("tenant:*", "1000/s")
    assert "recording on, keeping the last 600 s" in ok(cli, "limits", "record", "600")
    assert "recording the last 600 s" in ok(cli, "limits", "list")
    for _ in range(30):
        limiter.acquire("acme")
    limiter.acquire("bob")

    text = ok(cli, "limits", "preview", "tenant:*", "10/s")
    lines = text.splitlines()
    assert lines[0] == "tenant:* at 10/s burst 10, over the last 600 s recorded:"
    assert "31 admitted in 2 bucket(s);" in lines[1]
    assert "under the current 1000/s burst 1000: 0 would have waited" in lines[2]
    assert lines[3].split() == ["bucket", "admitted", "would", "wait", "share", "max", "wait", "s"]
    assert lines[4].split()[:2] == ["tenant:acme", "30"]
    assert len(lines) == 5  # bob would not have waited: no row
    result = json.loads(
        ok(cli, "limits", "preview", "tenant:acme", "5/s", "--window", "60", "--json")
    )
    assert (result["scope"], result["work"], result["window_s"]) == ("tenant:acme", 30, 60)
    assert 20 <= result["delayed"] <= 25
    quiet = ok(cli, "limits", "preview", "queue:sms", "1/s")
    assert "no recorded traffic goes through this scope's buckets" in quiet
    # Windows and credit, as `limits set` takes them.
    windows = json.loads(
        ok(cli, "limits", "preview", "tenant:acme", "5/s", "10/d", "--credit", "40", "--json")
    )
    assert windows["limit"] == "5/s burst 5 credit 40 + 10/d burst 10"
    assert windows["delayed"] == pytest.approx(20)  # the day's 10 bind

    assert "recording off" in ok(cli, "limits", "record", "off")
    assert "not being recorded" in failed(cli.invoke(main, ["limits", "preview", "global", "1/s"]))
    assert "expected seconds or 'off', got 'soon'" in failed(
        cli.invoke(main, ["limits", "record", "soon"])
    )
    assert "60 to 86400 seconds" in failed(cli.invoke(main, ["limits", "record", "10"]))


def test_empty_audit(cli: CliRunner) -> None:
    assert "no changes recorded" in ok(cli, "limits", "audit")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["limits", "set", "tenant:acme", "100/fortnight"], "unknown time unit 'fortnight'"),
        (["limits", "set", "tenant:acme", "0/s"], "greater than 0"),
        (["limits", "set", "tenant:acme", "nan/s"], "cannot parse limit"),
        (["limits", "set", "tenant:acme", "10/s", "--burst", "0.5"], "burst must be at least 1"),
        (["limits", "set", "tenants:acme", "10/s"], "unknown scope 'tenants:acme'"),
        (["limits", "get", "bogus"], "unknown scope 'bogus'"),
        (["limits", "get", "tenant:nobody"], "no limit is set for scope 'tenant:nobody'"),
        (["limits", "delete", "tenant:nobody"], "no limit is set for scope 'tenant:nobody'"),
        (["limits", "get", "tenant:a{b}"], "invalid tenant name"),
        (["limits", "exempt", "a:b"], "invalid tenant name"),
        (["--namespace", "bad ns", "limits", "list"], "invalid namespace 'bad ns'"),
        (["--url", "http://example.com", "limits", "list"], "bad Redis URL"),
    ],
)
def test_bad_input_gets_a_clear_error(cli: CliRunner, args: list[str], message: str) -> None:
    assert message in failed(cli.invoke(main, args))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # #12: each of these printed a usage block and exited 2; the README promises one
        # line and exit 1 for bad values, negative numbers included.
        (["limits", "set", "global", "-5/s"], "cannot parse limit '-5/s'"),
        (["limits", "set", "global", "5/s", "--burst", "abc"], "'abc' is not a valid float"),
        (["limits", "set", "global", "5/s", "--burst", "-5"], "burst must be a finite number"),
        (["limits", "exempt", "acme", "--mode", "bogus"], "'bogus' is not one of"),
        (["limits", "record", "-5"], "recording keeps 60 to 86400 seconds"),
        (["limits", "preview", "global", "-1/s"], "cannot parse limit '-1/s'"),
        (["limits", "weight", "tenant", "acme", "-5"], "weight must be a number from 0.001"),
        (["limits", "concurrency", "global", "-2"], "must be between 1 and 1,000,000 jobs"),
        (["limits", "dry-run", "maybe"], "'maybe' is not one of 'on', 'off'"),
        (["bench", "--buckets", "2"], "'2' is not one of '1', '3'"),
        # #12: both were accepted, the last one winning.
        (["limits", "set", "global", "5/s", "--shadow", "--enforce"], "exclude each other"),
        (["limits", "set", "global", "5/s", "--enforce", "--shadow"], "exclude each other"),
    ],
)
def test_bad_values_are_one_line_and_exit_1(
    cli: CliRunner, limiter: Limiter, args: list[str], message: str
) -> None:
    assert message in failed(cli.invoke(main, args))
    assert limiter.config_version() == 0  # nothing was changed


@pytest.mark.parametrize(
    "args", [["limits", "set", "global"], ["limits", "bogus"], ["limits", "list", "--bogus"]]
)
def test_usage_mistakes_show_the_usage_and_exit_2(cli: CliRunner, args: list[str]) -> None:
    result = cli.invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "Usage:" in result.output
    assert "Traceback" not in result.output


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.mark.parametrize(
    "args",
    [
        ["limits", "list"],
        ["limits", "set", "global", "10/s"],
        ["limits", "audit"],
        ["demo", "--duration", "1"],
    ],
)
def test_unreachable_redis_is_one_clean_line(args: list[str]) -> None:
    url = f"redis://user:s3cret@127.0.0.1:{closed_port()}/0"
    message = failed(CliRunner(env=NO_ENV).invoke(main, ["--url", url, *args]))
    assert "cannot reach Redis at redis://user:***@127.0.0.1:" in message
    assert "s3cret" not in message


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("", "--url is empty"),
        ("   ", "--url is empty"),
        ("redis://:pw@[::1/0", "Invalid IPv6 URL"),
        ("redis://127.0.0.1:1/0?socket_timeout=-1", "socket_timeout must be a number of seconds"),
        ("redis://127.0.0.1:1/0?socket_connect_timeout=0", "socket_connect_timeout must be"),
        ("redis://127.0.0.1:1/0?socket_timeout=nan", "socket_timeout must be"),
        ("redis://127.0.0.1:1/0?socket_timeout=soon", "Invalid value for 'socket_timeout'"),
        ("redis://127.0.0.1:99999/0", "Port out of range"),
        ("redis://127.0.0.1:1/zero", "the database must be a number"),
        (
            "http://127.0.0.1:1/0",
            "the scheme must be one of redis, rediss, unix, redis+cluster, rediss+cluster",
        ),
        ("redis+cluster://127.0.0.1:1/3", "a Redis Cluster has database 0 only"),
        ("redis+cluster://127.0.0.1:1/0?db=2", "a Redis Cluster has database 0 only"),
    ],
)
@pytest.mark.parametrize("args", [["limits", "list"], ["demo", "--duration", "1"]])
def test_a_bad_url_is_one_clean_line(url: str, reason: str, args: list[str]) -> None:
    """#11 finding 8: tracebacks for a malformed host or timeout, and '' meant localhost."""
    message = failed(CliRunner(env=NO_ENV).invoke(main, ["--url", url, *args]))
    assert reason in message
    assert "pw" not in message


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:{port}/0?password=hunter2",
        "redis://127.0.0.1:{port}/0?db=0&password=hunter2&socket_timeout=1",
        "redis://:hunter2@127.0.0.1:{port}/0",
        "redis://app:hunter2@127.0.0.1:{port}/0",
        "redis://hunter2@127.0.0.1:{port}/0",
        "rediss://app:hunter2@127.0.0.1:{port}/0",
        "redis://127.0.0.1:{port}/0?sentinel_password=hunter2",
    ],
)
def test_no_form_of_password_is_printed(url: str) -> None:
    """#11 finding 9: a password given as ?password= was printed in the error."""
    full = url.format(port=closed_port())
    for args in (["limits", "list"], ["limits", "set", "global", "1/s"]):
        message = failed(CliRunner(env=NO_ENV).invoke(main, ["--url", full, *args]))
        assert "hunter2" not in message
        assert "***" in message
    bad = full.replace("127.0.0.1", "[::1")  # unparsable: masked all the same
    message = failed(CliRunner(env=NO_ENV).invoke(main, ["--url", bad, "limits", "list"]))
    assert "hunter2" not in message


@pytest.mark.parametrize("make", [Limiter.from_url, AsyncLimiter.from_url])
@pytest.mark.parametrize(
    "url", ["", "redis://:hunter2@[::1/0", "redis://h/0?password=hunter2&socket_timeout=-1"]
)
def test_the_python_api_refuses_a_bad_url_with_a_typed_error(make: Any, url: str) -> None:
    with pytest.raises(ConfigError) as info:
        make(url)
    assert "hunter2" not in str(info.value)


def test_a_cluster_url_is_for_the_sync_clients_only() -> None:
    with pytest.raises(ConfigError, match="not for AsyncLimiter") as info:
        AsyncLimiter.from_url("redis+cluster://:hunter2@127.0.0.1:1/0")
    assert "hunter2" not in str(info.value)


def test_celery_settings_never_show_a_password() -> None:
    for url in (
        "redis://127.0.0.1:6379/0?password=hunter2",
        "redis://:hunter2@127.0.0.1:6379/0",
        "unix://:hunter2@/tmp/redis.sock?db=1",
        "unix:///tmp/redis.sock?password=hunter2",
    ):
        settings = CelerySettings(redis_url=url)
        assert "hunter2" not in repr(settings)
        assert "hunter2" not in str(settings)
        assert "***" in repr(settings)


def test_missing_url_hints_at_the_option(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("queue_ratelimit.cli.DEFAULT_URL", f"redis://127.0.0.1:{closed_port()}/0")
    message = failed(CliRunner(env=NO_ENV).invoke(main, ["limits", "list"]))
    assert "(set --url or REDIS_URL)" in message


def test_helpers() -> None:
    for text in ["100/s", "6000/m", "10/h", "1/d", "5/2s", "0.5/s", "1234567/s", "3/0.5s"]:
        assert Limit.parse(format_limit(Limit.parse(text))) == Limit.parse(text)
    assert format_limit(Limit.parse("5/2s")) == "5/2s"
    assert masked("redis://:pw@host:1/0") == "redis://:***@host:1/0"
    assert masked("redis://host:1/0") == "redis://host:1/0"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://host:1/0", "redis://host:1/0"),
        ("redis://:pw@host:1/0", "redis://:***@host:1/0"),
        ("redis://app:pw@host:1/0", "redis://app:***@host:1/0"),
        ("redis://pw@host:1/0", "redis://***@host:1/0"),  # some clients read it as a password
        ("redis://app:p@ss:w/rd@host:1/0", "redis://app:***@host:1/0"),  # unescaped @ and /
        ("rediss://app:pw@host:1/0", "rediss://app:***@host:1/0"),
        ("redis://host:1/0?password=pw&db=2", "redis://host:1/0?password=***&db=2"),
        ("redis://host/0?db=2&PASSWORD=pw", "redis://host/0?db=2&PASSWORD=***"),
        ("redis://host/0?ssl_password=pw", "redis://host/0?ssl_password=***"),
        ("unix://:pw@/run/redis.sock?db=1", "unix://:***@/run/redis.sock?db=1"),
        ("unix:///run/redis.sock?password=pw", "unix:///run/redis.sock?password=***"),
        (
            "sentinel://:pw@h1:26379;sentinel://:pw@h2:26379",
            "sentinel://:***@h1:26379;sentinel://:***@h2:26379",
        ),
        ("redis://:pw@[::1/0", "redis://:***@[::1/0"),  # too malformed to parse
    ],
)
def test_every_credential_form_is_masked(url: str, shown: str) -> None:
    assert mask_url(url) == shown


def test_demo_runs_on_the_embedded_engine() -> None:
    result = CliRunner(env=NO_ENV).invoke(main, ["demo", "--duration", "2"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "engine:    embedded" in out
    assert "summary over T = 2." in out
    assert "Every cap held." in out
    assert "\x1b[" not in out  # not a terminal: no cursor movement
    for scope in ["global", "tenant:acme", "tenant:globex:queue:reports", "queue:emails (shadow)"]:
        assert f"\n{scope} " in out


def test_demo_runs_on_redis(redis_url: str, redis_client: redis.Redis) -> None:
    result = CliRunner(env={**NO_ENV, "REDIS_URL": redis_url}).invoke(
        main, ["demo", "--duration", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "engine:    Redis at " in result.output
    assert "Every cap held." in result.output
    # The run's state stays for inspection in the demo namespace, and only there.
    listing = CliRunner(env={**NO_ENV, "REDIS_URL": redis_url}).invoke(
        main, ["--namespace", DEMO_NAMESPACE, "limits", "list"]
    )
    assert "tenant:globex:queue:reports" in listing.output
    keys = list(redis_client.scan_iter(match=f"qrl:{{{DEMO_NAMESPACE}}}:*"))
    redis_client.delete(*keys)


@pytest.mark.parametrize("buckets", ["1", "3"])
def test_bench_measures_and_cleans_up(
    cli: CliRunner, redis_client: redis.Redis, buckets: str
) -> None:
    result = json.loads(ok(cli, "bench", "--seconds", "0.4", "--buckets", buckets, "--json"))
    assert result["buckets"] == int(buckets)
    assert result["transport"] == "fcall"
    assert result["floor_per_s"] > 0
    assert result["acquire_per_s"] > 0
    assert 0 < result["acquire_vs_floor"] < 3  # a ratio of two rates, not a timing bound
    assert result["server_us_per_decision"] > result["floor_server_us"] > 0
    per_core = 1e6 / result["server_us_per_decision"]
    assert result["decisions_per_s_per_redis_core"] == pytest.approx(per_core, rel=1e-3)
    assert not list(redis_client.scan_iter(match="qrl:{bench-*"))  # its namespace is gone
    text = ok(cli, "bench", "--seconds", "0.2")
    assert "of a bare round trip" in text
    assert "one Redis core" in text


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "10.0.0.1", "example.com", ""])
def test_serve_without_a_token_refuses_a_non_loopback_address(host: str) -> None:
    """#11 finding 10: `serve --no-auth --host 0.0.0.0` served an open write API."""
    env = {**NO_ENV, "QUEUE_RATELIMIT_ADMIN_TOKEN": None}
    result = CliRunner(env=env).invoke(main, ["serve", "--no-auth", "--host", host])
    assert result.exit_code == 2, result.output
    assert "--no-auth serves on loopback only" in result.output


def test_serve_refuses_one_token_for_both_roles() -> None:
    env = {**NO_ENV, "QUEUE_RATELIMIT_ADMIN_TOKEN": "same", "QUEUE_RATELIMIT_READ_TOKEN": "same"}
    url = f"redis://127.0.0.1:{closed_port()}/0"
    result = CliRunner(env=env).invoke(main, ["--url", url, "serve"])
    assert result.exit_code == 2, result.output
    assert "must differ" in result.output


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.0.1", False),
        ("localhost.example.com", False),
        ("myhost", False),
    ],
)
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_weights_are_set_listed_and_bounded(cli: CliRunner, limiter: Limiter) -> None:
    assert ok(cli, "limits", "weight", "tenant", "bigco", "5").startswith("tenant bigco: weight 5")
    ok(cli, "limits", "weight", "priority", "bulk", "0.5")
    assert "weights: priority:bulk 0.5, tenant:bigco 5" in ok(cli, "limits", "list")
    listed = json.loads(ok(cli, "limits", "list", "--json"))
    assert listed["weights"] == {"weight:priority:bulk": 0.5, "weight:tenant:bigco": 5.0}
    for bad in ("5e-324", "1e-320", "0", "-1", "inf", "nan", "1e7"):  # #11 finding 7
        message = failed(cli.invoke(main, ["limits", "weight", "tenant", "tiny", bad]))
        assert "weight must be a number from 0.001 to 1e+06" in message
    refused = failed(cli.invoke(main, ["limits", "weight", "tenant", "tiny", "heavy"]))
    assert "expected a number or 'none'" in refused
    assert ok(cli, "limits", "weight", "tenant", "bigco", "none").startswith(
        "tenant bigco: back to the default weight"
    )
    assert "weights: priority:bulk 0.5\n" in ok(cli, "limits", "list")
    assert limiter.audit_log()[0].actor.startswith("cli")


def test_preview_counts_whole_jobs(cli: CliRunner, limiter: Limiter) -> None:
    """#12: `preview` printed "424.821 still waiting now": the replay is a fluid model, but
    jobs come whole."""
    limiter.set_limit("tenant:*", "1000/s")
    ok(cli, "limits", "record", "600")
    for _ in range(30):
        limiter.acquire("acme")
    text = ok(cli, "limits", "preview", "tenant:*", "7/3s", "--burst", "1")
    counts = re.fullmatch(
        r"  (\d+) admitted in 1 bucket\(s\); (\d+) \(\d+\.\d%\) would have waited, "
        r"up to \d+\.\d s; (\d+) still waiting now",
        text.splitlines()[1],
    )
    assert counts is not None, text
    admitted, waited, waiting = map(int, counts.groups())
    assert (admitted, waited) == (30, 29)
    assert 0 < waiting <= 29
    assert text.splitlines()[-1].split()[1:3] == ["30", "29"]  # the bucket's row too


@pytest.mark.parametrize(
    ("amount", "shown"),
    [(0.0, "0"), (424.821, "425"), (3.0000000001, "3"), (2.2, "3"), (12345.0, "12,345")],
)
def test_job_counts_round_up_a_partly_served_job(amount: float, shown: str) -> None:
    assert _jobs(amount) == shown


# -- backlog purge ----------------------------------------------------------------------------


def test_backlog_purge_drops_waiting_work_of_a_queue_or_a_tenant(
    cli: CliRunner, limiter: Limiter
) -> None:
    from queue_ratelimit import FairScheduler

    scheduler = FairScheduler(limiter)
    for i in range(3):
        scheduler.submit("acme", f"a{i}", queue="emails")
        scheduler.submit("other", f"o{i}", queue="emails")
        scheduler.submit("acme", f"r{i}", queue="reports")

    out = ok(cli, "backlog", "purge", "--queue", "emails", "--tenant", "acme", "--yes")
    assert out == "emails: purged 3 item(s) of tenant acme from the backlog\n"
    assert (scheduler.backlog("emails", "acme"), scheduler.backlog("emails")) == (0, 3)

    refused = cli.invoke(main, ["backlog", "purge", "-Q", "emails", "-Q", "reports"], input="n\n")
    assert refused.exit_code == 1
    assert "Drop 6 item(s)" in refused.output
    assert scheduler.backlog("emails") + scheduler.backlog("reports") == 6

    out = ok(cli, "backlog", "purge", "-Q", "emails", "-Q", "reports", "-f")
    assert out.splitlines() == [
        "emails: purged 3 item(s) from the backlog",
        "reports: purged 3 item(s) from the backlog",
    ]
    assert scheduler.backlog("emails") == scheduler.backlog("reports") == 0
    assert "invalid queue name" in failed(cli.invoke(main, ["backlog", "purge", "-Q", "a:b", "-f"]))
