"""``torch.compile(model, backend="kvpass")``: the dynamo backend, running the same driver."""
