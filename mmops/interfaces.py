"""The plugin contracts' public import path: third-party plugins write ``from mmops.interfaces import Fusion``.

The classes live in :mod:`mmops.core.interfaces`; this name stays so that packages written against
earlier releases keep working unchanged.
"""

from mmops.core.interfaces import MODALITIES, Encoder, Fusion, Tokens, as_tokens, link_or_copy_tree

__all__ = ["MODALITIES", "Encoder", "Fusion", "Tokens", "as_tokens", "link_or_copy_tree"]
