"""A warm worker per device: one long-lived process answers the ClientApp's messages (see ``worker``)."""
