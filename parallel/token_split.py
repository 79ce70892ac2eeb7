"""The token split lives in ``bagel_model.token_split`` (the model's generation sequence needs it, and bagel_model
must not import from parallel); re-exported here for the parallel strategies."""
from bagel_model.token_split import TokenSplit

__all__ = ["TokenSplit"]
