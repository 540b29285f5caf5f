"""Probe DAG: scheduled on the release asset, fed by a Kafka AssetWatcher; returns the releases.

The topic comes from the environment so the harness can point the watcher at its own broker;
real DAGs take topic and connection id from the xdc config instead.
"""
from __future__ import annotations

import os

import pendulum
from airflow.sdk import dag, get_current_context, task

from xdc.app.airflow_support import release_asset, release_payloads

RELEASES = release_asset([os.environ.get("XDC_PROBE_RELEASE_TOPIC", "xdc.releases")], "xdc_kafka")


@dag(dag_id="xdc_probe_release", schedule=[RELEASES], start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
     catchup=False)
def xdc_probe_release():
    @task
    def releases() -> list[dict]:
        return release_payloads(get_current_context())

    releases()


xdc_probe_release()
