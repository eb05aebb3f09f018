"""The retail customer-service domain: sandbox DB, tools, SOP policy, scripted customer and oracle."""

from pipeline.envs.customer_service.env import CustomerServiceEnv
from pipeline.envs.customer_service.oracle import oracle_policy

__all__ = ["CustomerServiceEnv", "oracle_policy"]
