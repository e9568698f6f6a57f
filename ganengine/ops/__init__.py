"""torch.library custom ops (namespace ``ganengine``), one module per op family.

Each module defines its ops with ``torch.library.custom_op``, a fake (meta) implementation,
autograd, autocast rules and the per-call backend dispatch (see ``_dispatch``).
"""
