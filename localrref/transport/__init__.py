"""Moves frames (bytes) between ranks and tensors through shared memory.

The transport knows nothing of RRefs, messages or codecs:

* :mod:`localrref.transport.mpqueue`: one inbox pipe per rank; ``Endpoint``
  sends and receives opaque frames.
* :mod:`localrref.transport.shm`: the shared-memory tensor lane; ``ShmPool``
  exports tensors as small picklable ``TensorHandle`` records and
  ``ShmMapper`` turns them back into tensors.

This file imports nothing, so that ``mpqueue`` stays usable without paying
for ``import torch``.
"""
