"""The `epp` command line as a newcomer meets it: every flag of every subcommand explains
itself and shows its default; every user error is one line on stderr and exit status 2,
with no traceback and no asyncio noise."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from epp.cli import SUBCOMMANDS, make_parser

REPO = Path(__file__).resolve().parents[2]


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _parsers(child)


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_flag_has_help_showing_its_default(name: str) -> None:
    missing, no_default = [], []
    for parser in _parsers(make_parser(name)):
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            label = f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"
            if not action.help:
                missing.append(label)
            elif action.option_strings and action.default not in (None, False, "", []):
                text = parser._get_formatter()._expand_help(action)
                if str(action.default) not in text:
                    no_default.append(f"{label}: {text!r}")
    assert not missing, f"flags without help: {missing}"
    assert not no_default, f"help without the default: {no_default}"


def test_serve_help_lists_defaults() -> None:
    text = make_parser("serve").format_help()
    assert "(default: 9002)" in text and "(default: 0.05)" in text


def epp(*args: str, cwd: Path | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "epp.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd or REPO, env=env)


def assert_user_error(res: subprocess.CompletedProcess[str], *needles: str) -> str:
    err = res.stderr.strip()
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and "Event loop is closed" not in err
    for n in needles:
        assert n in err, err
    return err


def free_ports(n: int) -> list[str]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [str(s.getsockname()[1]) for s in socks]
    for s in socks:
        s.close()
    return ports


def serve(*args: str) -> subprocess.CompletedProcess[str]:
    g, h, m = free_ports(3)
    return epp("serve", "--grpc-port", g, "--grpc-health-port", h, "--metrics-port", m, *args)


def test_serve_endpoint_source_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("endpoints:\n  - address: [\n")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("endpoints:\n  - {address: 127.0.0.1, port: 8000, bogus: 1}\n")
    assert_user_error(serve("--endpoints-file", str(bad)), "bad.yaml", "invalid YAML")
    assert_user_error(serve("--endpoints-file", str(tmp_path / "nope.yaml")), "does not exist")
    assert_user_error(serve("--endpoints-file", str(unknown)), "unknown key", "bogus")
    assert_user_error(serve("--endpoint", "notanip"), "notanip", "expected ip:port")
    assert_user_error(serve(), "no endpoint source")


def test_serve_config_flag_and_kubeconfig_errors(tmp_path: Path) -> None:
    ep = ("--endpoint", "127.0.0.1:8000")
    assert_user_error(serve(*ep, "--config-text", "plugins: ["), "EndpointPickerConfig")
    assert_user_error(serve(*ep, "--config-file", str(tmp_path / "x.yaml")), "--config-file")
    assert_user_error(serve(*ep, "--models-file", str(tmp_path / "m.yaml")), "--models-file")
    assert_user_error(serve("--pool-name", "p", "--kubeconfig", str(tmp_path / "k")),
                      "kubeconfig", "no such file")
    err = assert_user_error(serve(*ep, "--grpc-port", "abc"), "--grpc-port", "invalid int")
    assert "usage:" not in err


def test_serve_port_in_use_is_one_clear_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        h, m = free_ports(2)
        res = epp("serve", "--endpoint", "127.0.0.1:8000", "--grpc-port", port,
                  "--grpc-health-port", h, "--metrics-port", m)
        assert_user_error(res, f"--grpc-port: cannot listen on 127.0.0.1:{port}", "in use")
        g, h = free_ports(2)
        res = epp("serve", "--endpoint", "127.0.0.1:8000", "--grpc-port", g,
                  "--grpc-health-port", h, "--metrics-port", port)
        assert_user_error(res, "--metrics-port", "in use")


def test_render_explains_input_that_is_not_a_modelpool(tmp_path: Path) -> None:
    sample = "manifests/samples/pool-vllm.yaml"
    err = assert_user_error(epp("render", "-f", sample), sample, "no ModelPool",
                            "InferencePool", "kubectl", "modelpool-sim.yaml")
    assert "InferenceModel x2" in err
    assert_user_error(epp("render", "-f", str(tmp_path / "none.yaml")), "No such file")
    broken = tmp_path / "pool.yaml"
    broken.write_text("apiVersion: epp.dev/v1alpha1\nkind: ModelPool\nmetadata: {name: x}\n"
                      "spec: {model: {name: m, uri: 'ftp://x'}}\n")
    assert_user_error(epp("render", "-f", str(broken)), "ModelPool x", "uri")
    ok = epp("render", "-f", "manifests/samples/modelpool-sim.yaml")
    assert ok.returncode == 0 and "kind: InferencePool" in ok.stdout


def test_reconcile_and_pool_without_credentials(tmp_path: Path) -> None:
    missing = str(tmp_path / "kubeconfig")
    assert_user_error(epp("reconcile", "--once", "--kubeconfig", missing), "no such file")
    assert_user_error(epp("pool", "--kubeconfig", missing, "status", "p"), "no such file")
    assert_user_error(epp("pool", "distribute"), "the following arguments are required")
