"""`ledger-gateway --http-port` in front of a real three-node cluster: the HTTP API reaches the
replicated shards through the gateway's backend, and what it writes is what gRPC reads."""

from __future__ import annotations

from pathlib import Path

import httpx

from ledger_cluster.api.v1 import ledger_pb2
from ledger_cluster.localcluster.cluster import gateway_command
from tests.cluster import running_cluster
from tests.processes import LOOPBACK_HOST, free_ports, managed_process, wait_until_serving

CLIENT_TIMEOUT_SECONDS = 10.0


def test_gateway_serves_http(tmp_path: Path) -> None:
    with running_cluster(tmp_path / "cluster", shards=2) as cluster:
        port, metrics_port, http_port = free_ports(3)
        command = [*gateway_command(port, metrics_port, cluster.config_path), "--http-port", str(http_port)]
        log_path = tmp_path / "http-gateway.log"
        with managed_process(
            "ledger-gateway (HTTP)", command, log_path, env=cluster.gateway_environment()
        ) as gateway:
            wait_until_serving(gateway, f"{LOOPBACK_HOST}:{port}")
            with httpx.Client(
                base_url=f"http://{LOOPBACK_HOST}:{http_port}", timeout=CLIENT_TIMEOUT_SECONDS
            ) as client:
                created = client.post("/v1/accounts", json={}, headers={"Idempotency-Key": "gateway-http-1"})
                assert created.status_code == 200, created.text
                account_id = created.json()["account"]["id"]
                path = f"/v1/accounts/{account_id}/transactions"
                top_up = client.post(path, json={"amount": 25, "settled": True})
                assert top_up.status_code == 200, top_up.text
        # Read through the cluster's own gateway, over gRPC: the write is in the shards.
        account = (
            cluster.ledger_stub()
            .GetAccount(
                ledger_pb2.GetAccountRequest(account_id=account_id, consistent=True),
                timeout=CLIENT_TIMEOUT_SECONDS,
            )
            .account
        )
        assert (account.available_balance, account.settled_balance) == (25, 25)
