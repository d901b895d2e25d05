"""A fault-injecting ClientApp: fedmeta's own ClientApp, except that one partition's process dies hard
(`os._exit(1)`: no exception, no reply, the Ray worker is gone) on its TRAIN message of round 2.

tests/test_client_death.py copies this file into a copy of the Flower app and names `fault_app:app` as the
app's ClientApp, so that the real `fedmeta run` -> SuperLink -> flwr-simulation -> Ray path runs it.
"""

import os

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients.client_app import app as fedmeta_app
from fedmeta import wire

DIE_ROUND, DIE_PARTITION = 2, 0
app = ClientApp()


def _about(msg: Message) -> dict:
    """Every ConfigRecord of the message merged (the round and, with assign-partitions, the partition)."""
    merged: dict = {}
    for record in msg.content.config_records.values():
        merged.update(record)
    return merged


@app.train()
def train(msg: Message, context: Context) -> Message:
    about = _about(msg)
    partition = int(about.get(wire.PARTITION_ID, context.node_config["partition-id"]))
    if int(about.get(wire.SERVER_ROUND, 0)) == DIE_ROUND and partition == DIE_PARTITION:
        os._exit(1)  # what a segfault or the OOM killer looks like to Ray
    return fedmeta_app(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return fedmeta_app(msg, context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    return fedmeta_app(msg, context)
