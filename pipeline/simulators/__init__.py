"""User simulators: the other side of the conversation.

Every simulator implements :class:`pipeline.simulators.base.UserSimulator`; a domain ships its own (the
customer-service domain's scripted customer is deterministic and needs no model, which makes it the
one to train and test against; its LLM customer plays the same persona and goals on any
:mod:`pipeline.llm` backend).
"""

from pipeline.simulators.base import SimulatorReply, UserSimulator

__all__ = ["SimulatorReply", "UserSimulator"]
