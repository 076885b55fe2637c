"""``serve`` (one process or ``--workers N``) listens on a socket whose accepted connections get TCP_NODELAY (no 40 ms
delayed-ACK stalls), bound before the server starts."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest

from service.serving import tcp_listener


async def _nodelay_of_accepted(listener: socket.socket) -> int:
    seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    class Probe(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            sock = transport.get_extra_info("socket")
            seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    server = await asyncio.get_running_loop().create_server(Probe, sock=listener)
    try:
        port = listener.getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        value = await asyncio.wait_for(seen, 5)
        writer.close()
        return value
    finally:
        server.close()
        await server.wait_closed()


def test_connections_accepted_on_the_listener_have_nodelay() -> None:
    listener = tcp_listener("127.0.0.1", 0)
    assert listener.proto == socket.IPPROTO_TCP and listener.get_inheritable()
    assert asyncio.run(_nodelay_of_accepted(listener)) == 1


def test_a_plain_socket_would_not_get_nodelay() -> None:
    """The defect the listener avoids, so this test fails if asyncio ever changes and the workaround can go."""
    plain = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    plain.bind(("127.0.0.1", 0))
    assert asyncio.run(_nodelay_of_accepted(plain)) == 0


def test_a_port_in_use_is_an_error() -> None:
    first = tcp_listener("127.0.0.1", 0)
    first.listen()
    with pytest.raises(OSError):
        tcp_listener("127.0.0.1", first.getsockname()[1])
    first.close()


def test_serve_with_two_workers_answers_on_one_keep_alive_connection(tmp_path) -> None:
    from tests.integration.support import Process, base_env, free_port, run_cli, wait_healthy

    env = base_env(CDS_DATA_DIR=str(tmp_path), CDS_DEV_MODE="true", CDS_ENVIRONMENT="local")
    assert run_cli(["migrate"], env).returncode == 0
    port = free_port()
    api = Process("api", ["serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "2"], env, tmp_path)
    try:
        wait_healthy(api, f"http://127.0.0.1:{port}")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5.0) as client:
            assert [client.get("/cds-services").status_code for _ in range(5)] == [200] * 5
        assert len(api.children()) >= 2  # the supervisor and its two worker processes
    finally:
        api.stop()


def _metric_total(text: str, name: str) -> float:
    from tests.integration.support import metric_samples

    return sum(value for (sample, _), value in metric_samples(text).items() if sample == name)


def test_serve_with_two_workers_reports_the_sum_of_both_processes(tmp_path) -> None:
    """Each scrape, whichever process answers it, counts the calls of both: before, it saw only its own."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.integration.support import Process, base_env, free_port, run_cli, wait_healthy
    from tests.service.api.support import RISK, high_risk_dialysis_patient, hook_request

    base = tmp_path / "tmp"
    base.mkdir()
    env = base_env(CDS_DATA_DIR=str(tmp_path), CDS_DEV_MODE="true", CDS_ENVIRONMENT="local", TMPDIR=str(base))
    assert run_cli(["migrate"], env).returncode == 0
    port = free_port()
    shared = base / f"calcinosis-serve-metrics-{port}"  # the command's own directory, under the temporary one
    shared.mkdir()
    (shared / "counter_1.db").write_bytes(b"stale")  # a previous run's file: removed before the processes start
    url = f"http://127.0.0.1:{port}"
    api = Process("api", ["serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "2"], env, tmp_path)
    patient = high_risk_dialysis_patient("metrics-1")

    def call(_: int) -> int:  # a connection per call, four at a time: both processes take some
        response = httpx.post(f"{url}/cds-services/{RISK}", json=hook_request(RISK, patient.pid, prefetch=patient.prefetch()))
        assert response.status_code == 200, response.text
        return len(response.json()["cards"])

    try:
        wait_healthy(api, url)
        assert not (shared / "counter_1.db").exists()
        calls = cards = 0
        with ThreadPoolExecutor(4) as pool:
            while calls < 400:  # until both processes have answered calls (each then has its own latency file)
                cards += sum(pool.map(call, range(4)))
                calls += 4
                if len(list(shared.glob("histogram_*.db"))) >= 2:
                    break
        assert len(list(shared.glob("histogram_*.db"))) == 2
        assert cards >= calls  # the patient gets cards on every call
        for _ in range(10):
            text = httpx.get(f"{url}/metrics").text
            assert _metric_total(text, "cds_hook_request_seconds_count") == calls
            assert _metric_total(text, "cds_cards_total") == cards
    finally:
        api.stop()
    assert api.popen.returncode == 0, api.log()[-2000:]
    assert not shared.exists()  # removed when the server stops


def test_a_prometheus_directory_from_the_shell_is_ignored(tmp_path) -> None:
    """A one-process server given PROMETHEUS_MULTIPROC_DIR (here a directory that does not exist) keeps its metrics
    in memory: before, every hook call and /metrics failed with 500."""
    from tests.integration.support import Process, base_env, free_port, run_cli, wait_healthy
    from tests.service.api.support import RISK, high_risk_dialysis_patient, hook_request

    env = base_env(CDS_DATA_DIR=str(tmp_path), CDS_DEV_MODE="true", CDS_ENVIRONMENT="local", PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "nowhere"))
    assert run_cli(["migrate"], env).returncode == 0
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    api = Process("api", ["serve", "--host", "127.0.0.1", "--port", str(port)], env, tmp_path)
    patient = high_risk_dialysis_patient("metrics-2")
    try:
        wait_healthy(api, url)
        hook = httpx.post(f"{url}/cds-services/{RISK}", json=hook_request(RISK, patient.pid, prefetch=patient.prefetch()))
        assert hook.status_code == 200, hook.text
        metrics = httpx.get(f"{url}/metrics")
        assert metrics.status_code == 200
        assert _metric_total(metrics.text, "cds_hook_request_seconds_count") == 1
    finally:
        api.stop()
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_on_a_taken_port_is_one_line_exit_2(tmp_path, workers: str) -> None:
    from tests.integration.support import base_env, run_cli

    taken = tcp_listener("127.0.0.1", 0)
    taken.listen()
    port = taken.getsockname()[1]
    try:
        env = base_env(CDS_DATA_DIR=str(tmp_path))
        result = run_cli(["serve", "--host", "127.0.0.1", "--port", str(port), "--workers", workers], env)
    finally:
        taken.close()
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"calcinosis-cds: error: cannot listen on 127.0.0.1:{port}: Address already in use"]
    assert "Traceback" not in result.stderr


def test_serve_with_a_bad_thresholds_file_is_one_line_exit_2(tmp_path) -> None:
    from tests.integration.support import base_env, run_cli

    bad = tmp_path / "thresholds.json"
    bad.write_text('{"corrected_ca_renal_above": [not json')
    result = run_cli(["serve", "--workers", "2"], base_env(CDS_DATA_DIR=str(tmp_path), CDS_THRESHOLDS_FILE=str(bad)))
    assert result.returncode == 2
    assert result.stderr.startswith("calcinosis-cds: error: thresholds:") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


def test_worker_on_a_taken_metrics_port_is_one_line_exit_2(tmp_path) -> None:
    from tests.integration.support import base_env, run_cli

    taken = tcp_listener("127.0.0.1", 0)
    taken.listen()
    port = taken.getsockname()[1]
    try:
        result = run_cli(["worker"], base_env(CDS_DATA_DIR=str(tmp_path), CDS_WORKER_METRICS_PORT=str(port)))
    finally:
        taken.close()
    assert result.returncode == 2
    assert result.stderr == f"calcinosis-cds: error: cannot serve worker metrics on 127.0.0.1:{port}: Address already in use\n"
