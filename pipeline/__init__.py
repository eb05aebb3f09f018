"""turnwise: multi-turn reinforcement learning for LLM customer-service agents.

Dialog environments (`pipeline.envs`) produce multi-turn conversations, `rewards` scores them, and a TRL
GRPO trainer updates a LoRA adapter on the policy model. The same code runs on a laptop CPU and inside a
SageMaker GPU container. See ARCHITECTURE.md for the layout and the contracts between the parts.

Importing this package is cheap on purpose: torch and transformers are imported by the modules that need
them, so `turnwise --help` answers at once.
"""

__version__ = "0.1.0"
