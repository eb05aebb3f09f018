"""User simulators: the other side of the conversation.

Every simulator implements :class:`pipeline.simulators.base.UserSimulator`. The scripted customer is
deterministic and needs no model, which makes it the one to train and test against. The LLM customer
(:mod:`pipeline.simulators.llm`) plays the same persona and goals on any :mod:`pipeline.llm` backend
(local HF model, Bedrock, OpenAI-compatible); pass ``customer=LLMCustomerFactory(spec)`` to the
environment.
"""

from pipeline.simulators.base import SimulatorReply, UserSimulator
from pipeline.simulators.scripted import ScriptedCustomer

__all__ = ["ScriptedCustomer", "SimulatorReply", "UserSimulator"]
