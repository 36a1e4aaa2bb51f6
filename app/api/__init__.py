"""The HTTP layer: routes, schemas, dependencies and error mapping. It knows nothing of tensors."""
