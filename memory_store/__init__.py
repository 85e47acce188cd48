"""memory_store: the sharded, durable FAISS case bank M of memento-stream.

>>> from memory_store import CaseBank
>>> CaseBank(None, dim=4).stats()["cases"]
0
"""

from memory_store.bank import CaseBank, shard_of
from memory_store.options import BankOptions

__all__ = ["CaseBank", "BankOptions", "shard_of"]
