"""The imperative shell around the protocol core: threads, transport, futures."""
