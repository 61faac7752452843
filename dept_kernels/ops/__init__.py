"""Op contracts: validation, dispatch to a backend, autograd."""

from .dept_embedding import dept_embedding, official_dept_embedding, reference_dept_embedding

__all__ = ["dept_embedding", "official_dept_embedding", "reference_dept_embedding"]
