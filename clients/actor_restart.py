"""A simulated client whose process dies hard costs one message, once: the Ray backend restarts dead actors.

Flower 1.42's Simulation Engine runs ClientApps in a pool of Ray actors created without `max_restarts`
(flwr/simulation/ray_transport/ray_actor.py:424-426, `actor_type.options(**client_resources)`). When an
actor's process dies (os._exit, a segfault, the OOM killer), `RayBackend.process_message` puts the dead
actor back into the pool (flwr/server/superlink/fleet/vce/backend/raybackend.py:186-195), and the pool
hands out actors last-in-first-out (ray_actor.py:461 `pool.pop()`, :473 `pool.append(actor)`): the dead
actor gets the next message, fails it at once with ActorDiedError, goes back on top, and so on. Healthy
clients fail in every later round (measured: 1 of 4 nodes answered in each round after the death; Ray
describes the same trap for its `ActorPool`, ray-project/ray#50313).

The only way to set Ray actor options is the backend config's `client_resources`, which RayBackend passes
unchanged to `.options()`, and `flwr run` cannot carry it: its federation config is a fixed protobuf
(num-supernodes, client-resources-num-cpus/-num-gpus, init-args-*; flwr/simulation/app.py:79-109), and
`client-resources-max-restarts=-1` is refused ("Unknown simulation config field(s)"). So `install()` adds
Ray's actor options `max_restarts=-1` (restart the actor's process whenever it dies) and
`max_task_retries=1` to the client resources RayBackend validates, in the process that runs the Simulation
Engine (`flwr-simulation`, or `flwr.simulation.run_simulation` in-process). That process imports the
ClientApp module before it builds the actor pool (vce_api.py:373 loads the app; run_api builds the pool
later, :214-217). The message whose client died is retried once on the restarted process; if it kills that
one too, it fails (the client's recorded failure). A message that reaches the actor while it restarts is
retried too instead of failing with ActorUnavailableError (without the retry, a message of the next round
failed so in one of two trials). Nothing else is lost: the engine keeps every node's Context outside the
actors. Options that a backend config sets explicitly are kept.

Outside a simulation (a deployed SuperNode's flwr-clientapp) `install()` does nothing and imports nothing.
"""

from __future__ import annotations

import sys


def install() -> bool:
    """Make the Ray backend's ClientApp actors restartable; True if this process runs the Simulation Engine."""
    if "flwr.simulation" not in sys.modules:  # a deployed ClientApp: no Ray here, and no import cost
        return False
    try:
        from flwr.server.superlink.fleet.vce.backend import raybackend
    except ImportError:  # flwr without the simulation extra (no ray)
        return False
    backend = raybackend.RayBackend
    if getattr(backend, "_fedmeta_restarts_actors", False):
        return True
    validate = backend._validate_client_resources

    def _validate_client_resources(self, config):
        resources = validate(self, config)
        resources.setdefault("max_restarts", -1)  # Ray: restart the actor's process whenever it dies
        resources.setdefault("max_task_retries", 1)  # ... and run the message it was given once more
        return resources

    backend._validate_client_resources = _validate_client_resources
    backend._fedmeta_restarts_actors = True
    return True
