"""SageMaker container entry points: map SageMaker's environment onto turnwise configs and call `main`."""
