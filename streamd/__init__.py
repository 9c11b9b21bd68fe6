"""streamd: an event streaming log server and work queue in one.

Importing streamd sets ``GRPC_EXPERIMENTS=-event_engine_client,-event_engine_listener``
for this process unless the variable is already set (set it yourself, even to an
empty string, to opt out). grpcio 1.85's EventEngine costs about 100 us per message
round trip on a small machine (the measured figures, with their command and date, are
in bench/README.md, "gRPC's EventEngine"). The setting only works when streamd is
imported before grpc initializes.
"""

import os

os.environ.setdefault("GRPC_EXPERIMENTS", "-event_engine_client,-event_engine_listener")

__version__ = "0.1.0"
