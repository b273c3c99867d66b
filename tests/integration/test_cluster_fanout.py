"""Three `fastgate run` nodes on one real PostgreSQL store (tests/cluster_kit.py): every key
change reaches every node's shared memory (LISTEN/NOTIFY wake-ups, changes read from the
store), a revoke answers once every live node has acked it, a node SIGKILLed and restarted
catches up before it is ready, and a node that misses acks is listed and reports unready."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

from cluster_kit import Node, node_config
from conftest import ADMIN_TOKEN, raw_exchange, wait_for

IDS = ("n1", "n2", "n3")


@pytest.fixture
def cluster(tmp_path, pg_url, upstream):
    nodes = [Node(tmp_path / nid, node_config(upstream, pg_url, nid, capacity=16 if nid == "n3" else 1024), nid)
             for nid in IDS]
    try:
        for n in nodes:
            n.start(wait_ready=False)
        for n in nodes:
            n.wait_ready()
        # every node sees the two others live (heartbeats) before a test relies on acks
        assert wait_for(lambda: all(n.ready().json()["cluster"]["peers_live"] == 2 for n in nodes), 10), \
            [n.ready().json() for n in nodes]
        yield nodes
    finally:
        for n in nodes:
            n.stop()
    for n in nodes:
        assert "Traceback" not in n.log(), n.log()[-3000:]


def everywhere(nodes, key) -> list[int]:
    return [n.get(key) for n in nodes]


def test_revoke_under_load_is_refused_everywhere_once_acked(cluster):
    n1, n2, n3 = cluster
    made = n2.admin("POST", "/keys", json={"name": "loaded"}, expect=201).json()
    key = made["key"]
    assert wait_for(lambda: everywhere(cluster, key) == [200, 200, 200], 10)  # a create on n2 reaches all

    results: list[tuple[float, str, int]] = []  # (sent at, node, status)
    stop = threading.Event()

    def hammer(node):
        with httpx.Client(base_url=node.url, timeout=10) as c:
            for _ in range(20_000):  # bounded; stopped long before
                if stop.is_set():
                    return
                t = time.monotonic()
                status = c.get("/echo/x", headers={"x-api-key": key}).status_code
                results.append((t, node.node_id, status))

    threads = [threading.Thread(target=hammer, args=(n,)) for n in cluster]
    for t in threads:
        t.start()
    try:
        assert wait_for(lambda: {r[1] for r in results if r[2] == 200} == set(IDS), 10)  # load on every node
        r = n1.admin("POST", f"/keys/{made['id']}/revoke", expect=200).json()
        answered = time.monotonic()
        assert r["status"] == "revoked" and r["acked"] == list(IDS) and r["missing"] == [], r
        # keep the load going a while after the answer
        assert wait_for(lambda: all(sum(1 for x in results if x[0] > answered and x[1] == nid) >= 20
                                    for nid in IDS), 15)
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    after = [x for x in results if x[0] > answered]
    assert after and {x[1] for x in after} == set(IDS)
    # zero successes on any node after the answer: 401, or 429 once the failed-auth limiter
    # counts this client's refusals
    assert [x for x in after if x[2] not in (401, 429)] == []
    assert any(x[2] == 200 for x in results if x[0] < answered)


def test_update_rotate_delete_propagate_with_acks(cluster):
    n1, n2, n3 = cluster
    made = n1.admin("POST", "/keys", json={"name": "changing"}, expect=201).json()
    kid, key = made["id"], made["key"]
    assert wait_for(lambda: everywhere(cluster, key) == [200, 200, 200], 10)

    # update on n3: an allow list without loopback is refused on every node once answered
    r = n3.admin("PATCH", f"/keys/{kid}", json={"allow_cidrs": ["10.0.0.0/8"]}, expect=200).json()
    assert r["acked"] == list(IDS) and r["missing"] == [] and r["allow_cidrs"] == ["10.0.0.0/8"]
    assert everywhere(cluster, key) == [403, 403, 403]
    r = n2.admin("PATCH", f"/keys/{kid}", json={"allow_cidrs": []}, expect=200).json()
    assert r["acked"] == list(IDS)
    assert everywhere(cluster, key) == [200, 200, 200]

    # rotate on n2 without grace: the old secret is refused and the new one works everywhere
    r = n2.admin("POST", f"/keys/{kid}/rotate", json={}, expect=200).json()
    assert r["acked"] == list(IDS) and r["missing"] == []
    assert everywhere(cluster, key) == [401, 401, 401]
    assert everywhere(cluster, r["key"]) == [200, 200, 200]

    # delete on n3 (cluster mode answers 200 with the acks)
    r = n3.admin("DELETE", f"/keys/{kid}", expect=200).json()
    assert r == {"id": kid, "status": "deleted", "acked": list(IDS), "missing": []}
    assert everywhere(cluster, key) == [401, 401, 401]
    n1.admin("GET", f"/keys/{kid}", expect=404)

    # pipelined on one connection, the answers (one waiting for acks) leave in request order
    other = n1.admin("POST", "/keys", json={"name": "piped"}, expect=201).json()
    host, port = n1.admin_url.rsplit("/", 1)[1].split(":")
    auth = f"Authorization: Bearer {ADMIN_TOKEN}\r\n"
    raw = raw_exchange(int(port), (f"POST /keys/{other['id']}/revoke HTTP/1.1\r\nHost: a\r\n{auth}"
                                   f"Content-Length: 0\r\n\r\nGET /keys/{other['id']} HTTP/1.1\r\nHost: a\r\n{auth}"
                                   "Connection: close\r\n\r\n").encode(), timeout=10)
    first, second = raw.split(b"HTTP/1.1 ")[1:3]
    assert first.startswith(b"200") and b'"acked":["n1","n2","n3"]' in first, raw
    assert second.startswith(b"200") and b'"status":"revoked"' in second and b"acked" not in second, raw

    m = n1.metrics()
    assert m["fastgate_cluster_peers_live"] == 2 and m["fastgate_cluster_ack_timeouts_total"] == 0
    assert wait_for(lambda: n2.metrics()["fastgate_cluster_fanout_lag"] == 0, 5)
    # the store keeps one slot per node for each key, assigned by the node that applied it
    ready = n3.wait_ready()["cluster"]
    assert ready["node_id"] == "n3" and ready["applied_seq"] == ready["store_seq"] and ready["store"] == "ok"


def test_killed_node_is_missing_then_catches_up_before_ready(cluster, tmp_path):
    n1, n2, n3 = cluster
    keys = [n1.admin("POST", "/keys", json={"name": f"k{i}"}, expect=201).json() for i in range(3)]
    assert wait_for(lambda: all(everywhere(cluster, k["key"]) == [200, 200, 200] for k in keys), 10)

    n3.kill()  # the whole node: master, admin process, workers
    r = n1.admin("POST", f"/keys/{keys[0]['id']}/revoke", expect=200).json()
    assert r["acked"] == ["n1", "n2"] and r["missing"] == ["n3"], r
    # n3 was still live (its last heartbeat is recent): n1 waited ack_timeout for it
    assert n1.metrics()["fastgate_cluster_ack_timeouts_total"] == 1
    # changes while n3 is down: a rotation, an update, a new key
    rot = n2.admin("POST", f"/keys/{keys[1]['id']}/rotate", json={}, expect=200).json()
    assert rot["missing"] == ["n3"]
    n2.admin("PATCH", f"/keys/{keys[2]['id']}", json={"allow_cidrs": ["10.0.0.0/8"]}, expect=200)
    fresh = n1.admin("POST", "/keys", json={"name": "while-n3-down"}, expect=201).json()

    n3.start(wait_ready=False)
    n3.wait_ready()
    # at ready, n3 has every change made while it was down
    assert n3.get(keys[0]["key"]) == 401
    assert n3.get(keys[1]["key"]) == 401 and n3.get(rot["key"]) == 200
    assert n3.get(keys[2]["key"]) == 403
    assert n3.get(fresh["key"]) == 200
    # and acks again
    r = n2.admin("POST", f"/keys/{fresh['id']}/revoke", expect=200).json()
    assert r["acked"] == list(IDS) and r["missing"] == []
    assert everywhere(cluster, fresh["key"]) == [401, 401, 401]


def test_admin_respawned_after_missing_an_ack_replays_it(cluster, pg_url):
    """Only n3's admin process stops (its shared memory lives on in the master): it misses
    an ack, is marked in its nodes row, and its respawned successor replays the change."""
    n1, n2, n3 = cluster
    made = n1.admin("POST", "/keys", json={"name": "replayed"}, expect=201).json()
    assert wait_for(lambda: everywhere(cluster, made["key"]) == [200, 200, 200], 10)
    admin_pid = n3.admin("GET", "/healthz", expect=200).json()["admin_pid"]
    os.kill(admin_pid, signal.SIGSTOP)  # alive, not applying
    try:
        r = n1.admin("POST", f"/keys/{made['id']}/revoke", expect=200).json()
        assert r["missing"] == ["n3"] and r["acked"] == ["n1", "n2"], r
        seq = _last_seq(n1, made["id"])
        assert _sql(pg_url, "SELECT missed_seq FROM nodes WHERE node_id = 'n3'") == [(seq,)]
        assert n3.get(made["key"]) == 200  # n3's workers serve what its shared memory holds
    finally:
        os.kill(admin_pid, signal.SIGKILL)
        os.kill(admin_pid, signal.SIGCONT)
    # the master respawns the admin process, which replays from its row's applied number
    assert wait_for(lambda: _admin_pid(n3) not in (None, admin_pid), 15)
    state = n3.wait_ready()["cluster"]
    assert state["applied_seq"] >= seq
    assert n3.get(made["key"]) == 401
    assert n1.admin("POST", f"/keys/{made['id']}/revoke", expect=200).json()["missing"] == []


def test_node_whose_table_cannot_take_a_change_is_lagging_and_fails_closed(cluster):
    n1, n2, n3 = cluster  # n3's key table holds 16 keys, the others 1024
    made = [n1.admin("POST", "/keys", json={"name": f"f{i}"}, expect=201).json() for i in range(17)]
    r = wait_for(lambda: (x := n3.ready()).status_code == 503 and x, 10)
    assert r and r.json()["status"] == "lagging" and "do not fit" in r.json()["reason"], r.text
    # not in n3's table: refused there (creates do not wait for acks: n2 may apply it a moment later)
    assert wait_for(lambda: everywhere(cluster, made[-1]["key"]) == [200, 200, 401], 10)
    # n3 still applies (and acks) other changes
    r = n2.admin("POST", f"/keys/{made[0]['id']}/revoke", expect=200).json()
    assert r["acked"] == list(IDS)
    assert n3.get(made[0]["key"]) == 401
    # room again: n3 retries the key that did not fit and reports ready
    n1.admin("DELETE", f"/keys/{made[1]['id']}", expect=200)
    n3.wait_ready()
    assert everywhere(cluster, made[-1]["key"]) == [200, 200, 200]


def test_a_change_made_while_a_node_cannot_hear_it_still_reaches_it(cluster, pg_url):
    """Notifications are wake-ups only: n2's connections to the store are cut (so whatever is
    notified meanwhile is lost to it), a key is revoked; n2 catches up from the store."""
    n1, n2, n3 = cluster
    made = n1.admin("POST", "/keys", json={"name": "unheard"}, expect=201).json()
    assert wait_for(lambda: everywhere(cluster, made["key"]) == [200, 200, 200], 10)
    cut = _sql(pg_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'fastgate n2'")
    assert cut and all(ok for (ok,) in cut)
    n1.admin("POST", f"/keys/{made['id']}/revoke", expect=200)
    assert wait_for(lambda: n2.get(made["key"]) == 401, 10)
    assert wait_for(lambda: n2.ready().status_code == 200, 10)
    n3.admin("POST", f"/keys/{made['id']}/rotate", json={}, expect=409)  # revoked: refused, nothing written
    made2 = n3.admin("POST", "/keys", json={"name": "heard"}, expect=201).json()
    assert wait_for(lambda: everywhere(cluster, made2["key"]) == [200, 200, 200], 10)
    r = n3.admin("POST", f"/keys/{made2['id']}/revoke", expect=200).json()
    assert r["acked"] == list(IDS)  # n2 listens again
    assert "re-opening it" in n2.log()


def _admin_pid(node):
    try:
        return node.admin("GET", "/healthz").json()["admin_pid"]
    except httpx.HTTPError:
        return None


def _last_seq(node, key_id) -> int:
    return node.admin("GET", f"/audit?key_id={key_id}", expect=200).json()["events"][-1]["seq"]


def _sql(url, statement):
    import psycopg

    with psycopg.connect(url, autocommit=True) as c:
        return c.execute(statement).fetchall()
