"""The loss components, one module each (a module may declare a family, as `routing` does); the registry
(`jaxdistill/objective/registry.py`) lists them in order."""
