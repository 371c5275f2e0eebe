"""jaxunlearn: fast machine-unlearning research in JAX (ensembles, datamodels, unlearning, KLoM)."""
from jaxunlearn.errors import JaxUnlearnError

__version__ = "0.1.0"
__all__ = ["JaxUnlearnError", "__version__"]
