"""One router per resource: inference (`/v1/predict|embed|knn`), adapters and galleries, operations."""
