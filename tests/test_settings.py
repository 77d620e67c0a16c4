"""Settings: sizes, precedence, the broker URL file, CPU detection and the command line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from service.cpus import usable_cpus
from service.errors import ConfigError
from service.settings import (
    DEFAULT_BROKER_URL,
    Settings,
    env_name,
    load,
    parse_size,
)

REPO = Path(__file__).resolve().parent.parent
HUTCH = Path(sys.executable).with_name("hutch")
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# -- parse_size --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("0", 0),
        ("123", 123),
        (" 42 ", 42),
        ("10b", 10),
        ("10B", 10),
        ("1k", KiB),
        ("64K", 64 * KiB),
        ("64kb", 64 * KiB),
        ("64KiB", 64 * KiB),
        ("512kib", 512 * KiB),
        ("4M", 4 * MiB),
        ("4mb", 4 * MiB),
        ("4MiB", 4 * MiB),
        ("4Mi", 4 * MiB),
        ("1G", GiB),
        ("1GiB", GiB),
        ("2 gib", 2 * GiB),
        ("1 GB", GiB),
        ("1048576", MiB),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "text", ["", " ", "lots", "1.5G", "-1", "1TiB", "1T", "GiB", "1e6", "0x10", "1 G B", "4 MiBs"]
)
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(text)
    message = str(info.value)
    assert repr(text) in message
    assert "is not a size" in message
    assert "4MiB" in message  # shows an example of what works


# -- defaults and precedence ---------------------------------------------------------------------


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("service.settings.usable_cpus", lambda: 7)
    s = load({}, {})
    assert s.tasks is None
    assert s.queue == "default"
    assert s.concurrency == 7
    assert s.prefetch_buffer == 2
    assert s.prefetch == 9
    assert s.prefetch_time == 0.1
    assert load({"prefetch_time": "0"}, {}).prefetch_time == 0.0
    assert s.drain_timeout == 25.0
    assert s.time_limit == 840.0
    assert s.consumer_timeout == 1800.0
    assert s.max_deliveries == 5
    assert s.max_body_size == 4 * MiB
    assert s.max_result_size == 8 * MiB
    assert s.max_depth == 32
    assert s.memory_limit == 0
    assert s.max_tasks_per_child == 0
    assert s.max_memory_per_child == 0
    assert s.log_level == "INFO"
    assert s.broker_url == DEFAULT_BROKER_URL


def test_default_concurrency_is_usable_cpus() -> None:
    assert load({}, {}).concurrency == usable_cpus()


def test_env_name() -> None:
    assert env_name("max_body_size") == "HUTCH_MAX_BODY_SIZE"


@pytest.mark.parametrize(
    ("flag", "env", "expected"),
    [
        ("3", "5", 3),  # flag beats environment
        (None, "5", 5),  # environment beats default
        (None, None, 11),  # default
    ],
)
def test_precedence(
    monkeypatch: pytest.MonkeyPatch, flag: str | None, env: str | None, expected: int
) -> None:
    monkeypatch.setattr("service.settings.usable_cpus", lambda: 11)
    environ = {} if env is None else {"HUTCH_CONCURRENCY": env}
    assert load({"concurrency": flag}, environ).concurrency == expected


def test_precedence_for_every_kind_of_setting() -> None:
    args = {"queue": "from-flag", "max_body_size": "1MiB", "log_level": "debug", "tasks": "a, b"}
    environ = {
        "HUTCH_QUEUE": "from-env",
        "HUTCH_MAX_BODY_SIZE": "2MiB",
        "HUTCH_LOG_LEVEL": "error",
        "HUTCH_TASKS": "c",
        "HUTCH_TIME_LIMIT": "12.5",
        "HUTCH_MAX_TASKS_PER_CHILD": "0",
        "HUTCH_MEMORY_LIMIT": "512MiB",
    }
    s = load(args, environ)
    assert s.queue == "from-flag"
    assert s.max_body_size == MiB
    assert s.log_level == "DEBUG"
    assert s.tasks == ["a", "b"]
    assert s.time_limit == 12.5
    assert s.max_tasks_per_child == 0
    assert s.memory_limit == 512 * MiB


def test_a_good_flag_hides_a_bad_environment_value() -> None:
    # The environment is only read for settings the command line leaves unset.
    assert load({"concurrency": "2"}, {"HUTCH_CONCURRENCY": "zero"}).concurrency == 2


def test_load_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUTCH_QUEUE", "from-os-environ")
    assert load({}).queue == "from-os-environ"


def test_broker_url_from_environment() -> None:
    url = "amqp://u:p@broker.example:5672/vh"
    assert load({}, {"HUTCH_BROKER_URL": url}).broker_url == url


def test_broker_url_file(tmp_path: Path) -> None:
    url = "amqp://user:s3cret@rabbit.internal:5672/prod"
    path = tmp_path / "broker-url"
    path.write_text(f"  {url}\n\n")
    assert load({}, {"HUTCH_BROKER_URL_FILE": str(path)}).broker_url == url


def test_broker_url_file_is_used_only_when_the_variable_is_unset(tmp_path: Path) -> None:
    # README: HUTCH_BROKER_URL_FILE is "used when HUTCH_BROKER_URL is unset".
    path = tmp_path / "broker-url"
    path.write_text("amqp://from-file/\n")
    environ = {"HUTCH_BROKER_URL": "amqp://from-env/", "HUTCH_BROKER_URL_FILE": str(path)}
    assert load({}, environ).broker_url == "amqp://from-env/"
    # ...so a missing file does not matter then either.
    environ["HUTCH_BROKER_URL_FILE"] = str(tmp_path / "missing")
    assert load({}, environ).broker_url == "amqp://from-env/"


def test_broker_url_file_unreadable(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-file"
    with pytest.raises(ConfigError) as info:
        load({}, {"HUTCH_BROKER_URL_FILE": str(missing)})
    message = str(info.value)
    assert message.startswith("HUTCH_BROKER_URL_FILE: ")
    assert str(missing) in message


def test_broker_url_lists_several_nodes() -> None:
    urls = "amqp://a:pw1@rabbit-1:5672/prod, amqps://b:pw2@rabbit-2/prod?cafile=/ca.pem,"
    assert load({}, {"HUTCH_BROKER_URL": urls}).broker_url == (
        "amqp://a:pw1@rabbit-1:5672/prod,amqps://b:pw2@rabbit-2/prod?cafile=/ca.pem"
    )


def test_broker_url_file_may_hold_one_url_a_line(tmp_path: Path) -> None:
    path = tmp_path / "broker-url"
    path.write_text("amqp://u:p@rabbit-1/v\namqp://u:p@rabbit-2/v,amqp://u:p@rabbit-3/v\n")
    assert load({}, {"HUTCH_BROKER_URL_FILE": str(path)}).broker_url == (
        "amqp://u:p@rabbit-1/v,amqp://u:p@rabbit-2/v,amqp://u:p@rabbit-3/v"
    )


@pytest.mark.parametrize(
    ("urls", "says"),
    [
        (
            "amqp://u:s3cret@h1/,http://u:s3cret@h2/",
            "URL 2 of 2: http://u:******@h2/ is not an AMQP",
        ),
        ("amqp://u:s3cret@h1/,amqp://u:s3cret@h2:70000/", "URL 2 of 2: amqp://u:******@h2:70000/"),
        ("amqp://u:s3cret@/,amqp://u:s3cret@h2/", "URL 1 of 2: amqp://u:******@/ names no host"),
        ("amqp://u:s3cret@h1/a,amqp://u:s3cret@h2/b", "different virtual hosts ('a', 'b')"),
        (" , ", "no broker URL given"),
    ],
)
def test_a_bad_url_in_the_list_is_named_with_its_password_masked(urls: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        load({}, {"HUTCH_BROKER_URL": urls})
    assert str(info.value).startswith("HUTCH_BROKER_URL: ") and says in str(info.value)
    assert "s3cret" not in str(info.value)


def test_a_bad_url_in_the_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broker-url"
    path.write_text("amqp://u:s3cret@h1/\nrabbit-2:5672\n")
    with pytest.raises(ConfigError) as info:
        load({}, {"HUTCH_BROKER_URL_FILE": str(path)})
    assert f"HUTCH_BROKER_URL_FILE ({path}): URL 2 of 2" in str(info.value)


def test_tls_is_checked_for_every_url_of_the_list() -> None:
    urls = "amqps://u:p@h1/,amqps://u:secret@h2/?no_verify_ssl=1"
    with pytest.raises(ConfigError) as info:
        load({}, {"HUTCH_BROKER_URL": urls})
    assert "amqps://u:******@h2/" in str(info.value) and "HUTCH_INSECURE_TLS" in str(info.value)


def test_publish_timeout_from_environment() -> None:
    from service.settings import DEFAULT_PUBLISH_TIMEOUT, publish_timeout_from_env

    assert publish_timeout_from_env({}) == DEFAULT_PUBLISH_TIMEOUT == 30
    assert publish_timeout_from_env({"HUTCH_PUBLISH_TIMEOUT": "2.5"}) == 2.5
    with pytest.raises(ConfigError, match="HUTCH_PUBLISH_TIMEOUT: '0' must be a positive"):
        publish_timeout_from_env({"HUTCH_PUBLISH_TIMEOUT": "0"})


def test_tasks_list_parsing() -> None:
    assert load({"tasks": " pkg.a ,pkg.b,, "}, {}).tasks == ["pkg.a", "pkg.b"]
    with pytest.raises(ConfigError, match=r"^--tasks: name at least one module"):
        load({"tasks": " , "}, {})


# -- errors name the flag or the variable ----------------------------------------------------------

BAD_VALUES = [
    ("concurrency", "zero"),
    ("concurrency", "0"),
    ("concurrency", "-3"),
    ("prefetch_buffer", "-1"),
    ("prefetch_time", "-0.1"),
    ("prefetch_time", "nan"),
    ("prefetch_time", "inf"),
    ("drain_timeout", "0"),
    ("time_limit", "-1"),
    ("time_limit", "nan"),
    ("time_limit", "soon"),
    ("consumer_timeout", "0"),
    ("max_deliveries", "0"),
    ("max_body_size", "lots"),
    ("max_result_size", "1.5MiB"),
    ("max_depth", "0"),
    ("memory_limit", "-1"),
    ("max_tasks_per_child", "-1"),
    ("max_memory_per_child", "big"),
    ("log_level", "loud"),
    ("queue", "high,,low"),
    ("queue", "high,low,high"),
    ("queue", "bad*name"),
]


@pytest.mark.parametrize(("name", "raw"), BAD_VALUES)
def test_bad_flag_names_the_flag(name: str, raw: str) -> None:
    flag = "--" + name.replace("_", "-")
    with pytest.raises(ConfigError) as info:
        load({name: raw}, {})
    message = str(info.value)
    assert message.startswith(f"{flag}: ")
    assert "\n" not in message


@pytest.mark.parametrize(("name", "raw"), BAD_VALUES)
def test_bad_environment_value_names_the_variable(name: str, raw: str) -> None:
    variable = env_name(name)
    with pytest.raises(ConfigError) as info:
        load({}, {variable: raw})
    assert str(info.value).startswith(f"{variable}: ")


def test_bad_value_messages_say_why() -> None:
    with pytest.raises(ConfigError, match=r"'0' must be a whole number of at least 1"):
        load({"concurrency": "0"}, {})
    with pytest.raises(ConfigError, match=r"'lots' is not a size"):
        load({}, {"HUTCH_MAX_BODY_SIZE": "lots"})
    with pytest.raises(ConfigError, match=r"not one of DEBUG, INFO, WARNING, ERROR"):
        load({"log_level": "loud"}, {})


def test_several_queues_in_priority_order() -> None:
    s = load({"queue": " high, default ,low"}, {})
    assert s.queues == ("high", "default", "low")
    assert load({}, {"HUTCH_QUEUE": "a,b"}).queues == ("a", "b")
    assert load({}, {}).queues == ("default",)


def test_bad_queue_lists_say_what_to_do() -> None:
    with pytest.raises(ConfigError, match=r"--queue: 'a,b,a' names queue 'a' twice"):
        load({"queue": "a,b,a"}, {})
    with pytest.raises(ConfigError, match=r"HUTCH_QUEUE: 'a,' has an empty queue name"):
        load({}, {"HUTCH_QUEUE": "a,"})
    with pytest.raises(ConfigError, match=r"no '\*' or '#'"):
        load({"queue": "a,b#"}, {})


# -- the command line ----------------------------------------------------------------------------


def run_hutch(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HUTCH_")}
    # Nothing may reach a broker: port 1 on loopback refuses at once.
    environ["HUTCH_BROKER_URL"] = "amqp://guest:guest@127.0.0.1:1/"
    environ.update(env)
    return subprocess.run(
        [str(HUTCH), *args],
        capture_output=True,
        text=True,
        env=environ,
        cwd=REPO,
        timeout=30,
    )


def assert_usage_error(result: subprocess.CompletedProcess[str], *names: str) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("hutch: error: ")
    for name in names:
        assert name in line
    return line


def test_hutch_is_installed() -> None:
    assert HUTCH.exists(), f"{HUTCH} missing: install the project into the venv"


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--concurrency", "zero"], ["--concurrency", "zero"]),
        (["--concurrency", "0"], ["--concurrency", "at least 1"]),
        (["--max-body-size", "lots"], ["--max-body-size", "'lots' is not a size"]),
        (["--tasks", "x", "--log-level", "loud"], ["--log-level", "loud"]),
        (["--tasks", "x", "--time-limit", "-1"], ["--time-limit"]),
        (["--tasks", "x", "--queue", "high,low,high"], ["--queue", "'high' twice"]),
        (["--tasks", "x", "--queue", "high,,low"], ["--queue", "empty queue name"]),
    ],
)
def test_cli_bad_flag(args: list[str], names: list[str]) -> None:
    assert_usage_error(run_hutch("worker", *args), *names)


def test_cli_bad_environment_value() -> None:
    result = run_hutch("worker", "--tasks", "x", HUTCH_MAX_DEPTH="deep")
    assert_usage_error(result, "HUTCH_MAX_DEPTH", "deep")


def test_cli_worker_without_tasks() -> None:
    assert_usage_error(run_hutch("worker"), "--tasks", "HUTCH_TASKS")


def test_cli_unknown_command() -> None:
    result = run_hutch("bogus")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "bogus" in result.stderr
    assert "invalid choice" in result.stderr


def test_cli_no_command() -> None:
    result = run_hutch()
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_cli_broker_url_is_not_a_flag() -> None:
    # A password on the command line would show in `ps`.
    result = run_hutch("worker", "--tasks", "x", "--broker-url", "amqp://u:secret@h/")
    assert result.returncode == 2
    assert "unrecognized arguments" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_missing_task_module() -> None:
    line = assert_usage_error(
        run_hutch("worker", "--tasks", "no_such_module_xyz"), "no_such_module_xyz"
    )
    assert "import" in line


def test_cli_worker_help_lists_every_setting() -> None:
    result = run_hutch("worker", "--help", COLUMNS="100")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for f in fields(Settings):
        if f.metadata["flag"]:
            flag = "--" + f.name.replace("_", "-")
            assert re.search(rf"{flag} {f.name.upper()}\b", text), flag
            assert f"[env {env_name(f.name)}]" in text, f.name
            assert " ".join(f.metadata["help"].split()) in text, f.name
        else:
            assert env_name(f.name) in text, f.name
    assert "HUTCH_BROKER_URL_FILE" in text
    assert "--broker-url" not in text


def test_cli_help() -> None:
    result = run_hutch("--help")
    assert result.returncode == 0
    assert "worker" in result.stdout
    assert "call" in result.stdout


def test_amqps_without_verification_needs_an_explicit_second_setting() -> None:
    url = "amqps://user:secret@broker.example/?no_verify_ssl=1"
    with pytest.raises(ConfigError) as info:
        load({}, {"HUTCH_BROKER_URL": url})
    assert "HUTCH_INSECURE_TLS" in str(info.value) and "secret" not in str(info.value)
    assert load({}, {"HUTCH_BROKER_URL": url, "HUTCH_INSECURE_TLS": "yes"}).insecure_tls
    # Verification on (the default) needs nothing.
    assert not load({}, {"HUTCH_BROKER_URL": "amqps://u:p@h/"}).insecure_tls


def test_json_logs_carry_task_fields_and_no_secrets() -> None:
    import json as json_module
    import logging

    from service.broker import safe_url
    from service.logs import JSONFormatter, task_fields

    record = logging.LogRecord(
        "service.settle",
        logging.WARNING,
        __file__,
        1,
        "task failed at %s",
        (safe_url("amqp://u:hunter2@h/"),),
        None,
    )
    for key, value in task_fields("app.resize", "id-1", 2).items():
        setattr(record, key, value)
    entry = json_module.loads(JSONFormatter().format(record))
    assert entry["level"] == "WARNING" and entry["logger"] == "service.settle"
    assert (entry["task"], entry["task_id"], entry["attempt"]) == ("app.resize", "id-1", 2)
    assert "hunter2" not in entry["message"] and "******" in entry["message"]
