"""wa: weight archeology in JAX."""

import os

__version__ = "0.1.0"

# transformers 5 advises at import that without PyTorch "Models won't be available": wa builds every model itself
# and uses transformers for configs and tokenizers only, so the advice would only mislead. A user's own setting wins.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
