"""Fleet updates: an update server publishes signed bundle versions; device agents install them into A/B slots,
verify, try and commit them or roll them back by themselves (docs/fleet.md).

    protocol.py  routes, states and the documents server and agents exchange
    publish.py   the server's directory: publishing versions to channels, device reports, the download log
    server.py    the update server's HTTP app
    slots.py     a device's A/B slots and its atomic pointer
    download.py  the agent's HTTP client: resumable downloads checked by sha256
    canary.py    prediction statistics of the new version against the served one, on the device's images
    agent.py     the device agent's state machine
"""

from cvdeploy.fleet.agent import Agent, AgentSettings
from cvdeploy.fleet.protocol import STATES, ChannelDoc, StatusReport
from cvdeploy.fleet.publish import FleetRoot, load_token
from cvdeploy.fleet.slots import Device, active_bundle

__all__ = ["STATES", "Agent", "AgentSettings", "ChannelDoc", "Device", "FleetRoot", "StatusReport", "active_bundle", "load_token"]
