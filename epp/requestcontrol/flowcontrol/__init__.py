"""Flow control: requests wait in the EPP, not in a saturated pod's queue (see controller.py)."""

from epp.requestcontrol.flowcontrol.aio import AsyncFlowWaiter
from epp.requestcontrol.flowcontrol.config import FlowControlSettings, parse_flow_control
from epp.requestcontrol.flowcontrol.controller import FlowController, FlowObserver
from epp.requestcontrol.flowcontrol.queue import Ticket, TicketState
from epp.requestcontrol.flowcontrol.saturation import SaturationDetector

__all__ = [
    "AsyncFlowWaiter",
    "FlowControlSettings",
    "FlowController",
    "FlowObserver",
    "SaturationDetector",
    "Ticket",
    "TicketState",
    "parse_flow_control",
]
