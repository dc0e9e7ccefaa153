"""A short soak inside ``make test``; ``make soak`` runs the long one."""

from __future__ import annotations

from soak import run_soak


def test_soak_with_clients_killed_at_random(start_broker, dsn, figures):
    broker = start_broker(max_connections=4, log_level="INFO")
    report = run_soak(broker, dsn, requests=50_000, processes=32, kill_interval=0.2)
    figures(f"[soak] {report.summary()}")
    assert report.first_failures == []
    assert report.failed == report.mismatched == report.stale_replies == 0
    assert report.kills > 0
    assert report.lost_writes == 0 and report.phantom_writes == 0
    assert report.max_connections_seen <= 4
    assert report.rss_growth < 0.10
