"""PulmoMed Edge: the offline Spanish AI teacher for the PulmoMed VR lung-cancer simulator."""

import os

__version__ = "0.1.0"

# Before anything imports onnxruntime: its telemetry writes a device id and events under the
# user's home and looks up Microsoft's collector while we serve. The product is offline, and a
# classroom laptop must not leak student sessions (disable_telemetry_events() after the import
# still stores the first event).
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
