"""User simulators: the other side of the conversation.

Every simulator implements :class:`pipeline.simulators.base.UserSimulator`. The scripted customer is
deterministic and needs no model, which makes it the one to train and test against; LLM-driven
simulators (local HF model, Bedrock, OpenAI-compatible) plug into the same protocol.
"""

from pipeline.simulators.base import SimulatorReply, UserSimulator
from pipeline.simulators.scripted import ScriptedCustomer

__all__ = ["ScriptedCustomer", "SimulatorReply", "UserSimulator"]
