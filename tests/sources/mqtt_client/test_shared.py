"""Shared subscriptions: several Isthmus nodes split one broker's load (mosquitto 2 supports $share)."""

from __future__ import annotations

import json
from typing import Any

import pytest

SHARED = [{"filter": "$share/isthmus/pebble/+/data", "device": "pebble/{device}/data"}]


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_two_nodes_share_a_subscription_and_split_the_messages(
    broker: Any, kit: Any, publishers: Any, tmp_path: Any, protocol: str
) -> None:
    # Two runtimes with their own data directories and client ids: two Isthmus nodes.
    nodes = []
    for node in ("a", "b"):
        source = kit.source("pebble", broker.url, SHARED, client_id=f"node-{node}", protocol=protocol)
        nodes.append(await kit.start([source], data_dir=tmp_path / node))
    node_a, node_b = nodes
    await broker.wait_log("Sending SUBACK to node-a")
    await broker.wait_log("Sending SUBACK to node-b")

    pub = await publishers(broker.port)
    for seq in range(40):
        pub.publish(f"pebble/node-{seq % 4}/data", json.dumps({"seq": seq}).encode())

    async def all_arrived() -> tuple[list[int], list[int]] | None:
        a = [json.loads(r.frame.payload)["seq"] for r in await kit.records(node_a)]
        b = [json.loads(r.frame.payload)["seq"] for r in await kit.records(node_b)]
        return (a, b) if len(a) + len(b) >= 40 else None

    a, b = await kit.wait_for(all_arrived, what="40 messages over both nodes")
    assert sorted(a + b) == list(range(40)), "each message reached exactly one node"
    assert a and b, "the broker spread the messages over both nodes"
    assert a == sorted(a) and b == sorted(b)
    for rt, seqs in ((node_a, a), (node_b, b)):
        devices = {d.source_ids["device"] for d in rt.store.list_physical(source="pebble")}
        assert devices == {f"node-{s % 4}" for s in seqs}
