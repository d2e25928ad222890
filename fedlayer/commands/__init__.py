"""Entry points: fedlayer-sim, fedlayer-server / fedlayer-client, fedlayer-run, and the quiet SuperLink."""
